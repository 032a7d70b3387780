"""Several datasets as one training table, each row knowing its lab (``source``).

:func:`read_datasets` reads every path with :func:`leukoscope.data.readers.read_dataset` and
stacks the tables. Each row's ``source`` is its dataset's own (the reader's ``source``
column: a manifest's, or the folder name); where two datasets would give the same source
name, the colliding names are prefixed with the dataset's folder name (``labA:lmu``), so
that labs stay apart for balanced sampling (``balance_by="source_class"``) and the scale
estimate. The same image in two datasets is an error.

>>> ds = read_datasets(["../shared/data/pbc", "lab_export"])     # doctest: +SKIP
>>> ds.table.groupby("source").size()                          # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from leukoscope.data.readers import CellDataset, read_dataset


def _name(path: Path) -> str:
    path = path.resolve()
    return (path.parent.name if path.is_file() else path.name) or str(path)


def read_datasets(paths: Sequence[str | os.PathLike],
                  label_maps: Sequence | Mapping | str | os.PathLike | None = None) -> CellDataset:
    """One :class:`CellDataset` (layout ``"multi"``) of several datasets; see the module docstring.

    ``label_maps``: one label map for all datasets, or a list with one per path (``None``
    entries for none).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no datasets given")
    if isinstance(label_maps, (list, tuple)):
        if len(label_maps) != len(paths):
            raise ValueError(f"{len(label_maps)} label maps for {len(paths)} datasets")
        maps = list(label_maps)
    else:
        maps = [label_maps] * len(paths)
    parts = [read_dataset(p, label_map=m) for p, m in zip(paths, maps)]
    if len(parts) == 1:
        return parts[0]
    tables = []
    for p, ds in zip(paths, parts):
        t = ds.table.copy()
        own = t["source"].astype("string") if "source" in t else pd.Series(pd.NA, index=t.index, dtype="string")
        t["source"] = own.fillna(_name(p)).astype(str)
        t["dataset"] = str(p)
        tables.append(t)
    owners: dict[str, set[int]] = {}
    for i, t in enumerate(tables):
        for s in set(t["source"]):
            owners.setdefault(s, set()).add(i)
    for p, t in zip(paths, tables):
        t["source"] = [f"{_name(p)}:{s}" if len(owners[s]) > 1 else s for s in t["source"]]
    table = pd.concat(tables, ignore_index=True)
    resolved = table["path"].map(lambda x: str(Path(x).resolve()))
    dup = resolved.duplicated(keep=False)
    if dup.any():
        first = resolved[dup].iloc[0]
        where = sorted(set(table.loc[resolved == first, "dataset"]))
        raise ValueError(f"the same image is in more than one dataset ({' and '.join(where)}), e.g. {first}; "
                         "give each image once")
    root = Path(os.path.commonpath([str(Path(p).resolve().parent if Path(p).is_file() else Path(p).resolve())
                                    for p in paths]))
    return CellDataset(
        table=table, layout="multi", root=root,
        skipped=[s for ds in parts for s in ds.skipped],
        notes=[f"{p}: {n}" for p, ds in zip(paths, parts) for n in ds.notes],
        extra={"datasets": [{"path": str(p), "layout": ds.layout, "n": len(ds), "sources": sorted(set(t["source"]))}
                            for p, ds, t in zip(paths, parts, tables)]},
    )
