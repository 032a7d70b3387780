"""Dataset readers (LMU layout, folder per class, CSV manifest) and splits.

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
    read_label_map,
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
    "CellDataset", "check_images", "detect_layout", "read_annotations", "read_dataset",
    "read_label_map", "align_split", "fold_tables", "make_split", "read_split", "stratified_val_split",
    "write_split",
]
