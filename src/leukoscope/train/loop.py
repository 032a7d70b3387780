"""What training needs from the data: its classes, the table's fingerprint, the images' physical scale.

The run itself is :class:`leukoscope.train.trainer.Trainer` (:func:`leukoscope.train.train`);
its settings are :class:`leukoscope.train.config.TrainConfig`.

:func:`resolve_training_scale` decides the physical scale of the training images
(``meta["training_scale"]`` of the bundle: the table's µm/px, or with ``scale="estimate"`` the
red-cell estimate per source) by asking the one scale policy,
:class:`leukoscope.imaging.scale_policy.ScalePolicy`. The out-of-distribution reference that
the bundle stores is fitted by :func:`leukoscope.models.ood.fit_training_reference`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pandas as pd

from leukoscope import taxonomy
from leukoscope.data import CellDataset
from leukoscope.imaging.scale_policy import ScalePolicy
from leukoscope.train.config import SCALE_MODES


def classes_of(labels) -> tuple[str, ...]:
    """The taxonomy classes present in ``labels``, in taxonomy order (an unknown label is an error)."""
    present = set(labels)
    for c in present:
        taxonomy.check_class(c)
    return tuple(c for c in taxonomy.CLASSES if c in present)


def table_fingerprint(table: pd.DataFrame) -> str:
    """SHA-256 over sorted (path relative to the common folder, label, file size)."""
    paths = [str(p) for p in table["path"]]
    root = os.path.commonpath(paths) if paths else "."
    if len(paths) == 1:
        root = os.path.dirname(root)
    return CellDataset(table=table[["path", "label"]].reset_index(drop=True), layout="table", root=Path(root)).fingerprint()


def resolve_training_scale(table: pd.DataFrame, scale: str = "stated", *,
                           log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """``(table, record)``: the training table with the µm/px of its images, and what the bundle records.

    ``scale="stated"``: the table's ``um_per_px`` where the reader gave one; other images
    are resized to the model input as they are (no physical scale).
    ``scale="estimate"``: where the table gives no µm/px, it is estimated from the red
    cells (the scale policy, :class:`leukoscope.imaging.scale_policy.ScalePolicy`), pooled over up to 40
    images per ``source`` (one pool when the table has no ``source`` column). An
    implausible estimate (too few red cells, outside 0.03-0.5 µm/px) is not used: those
    images are resized as with ``"stated"``, and a warning says so.

    ``record``: ``{"scale", "sources": {source: {"um_per_px", "origin", "n_images"}},
    "estimates": {source: ScaleEstimate as a dict}, "warnings"}``.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {', '.join(SCALE_MODES)}, got {scale!r}")
    table = table.reset_index(drop=True)
    um, _, rec = ScalePolicy(estimate="group" if scale == "estimate" else "off").resolve(table, reemit=True, log=log)
    if scale == "estimate":
        table = table.copy()
        table["um_per_px"] = um
    return table, {"scale": scale, "sources": rec.sources, "estimates": rec.estimates, "warnings": rec.warnings}
