"""Dataset readers (LMU layout, folder per class, CSV manifest, and any registered with
:func:`register_reader`) and splits.

>>> from leukoscope.data import read_dataset          # doctest: +SKIP
>>> ds = read_dataset("../shared/data/pbc")            # doctest: +SKIP
>>> ds.counts()["NGS"]                                 # doctest: +SKIP
460
"""

from leukoscope.data.readers import (
    CellDataset,
    check_images,
    detect_layout,
    read_annotations,
    read_dataset,
    read_datasets,
    read_label_map,
    register_reader,
    unregister_reader,
)
from leukoscope.data.splits import (
    align_split,
    fold_tables,
    make_split,
    read_split,
    stratified_val_split,
    write_split,
)

__all__ = [
    "CellDataset", "check_images", "detect_layout", "read_annotations", "read_dataset", "read_datasets",
    "read_label_map", "register_reader", "unregister_reader", "align_split", "fold_tables", "make_split",
    "read_split", "stratified_val_split", "write_split",
]
