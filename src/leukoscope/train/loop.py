"""What training needs from the data: classes, the table's fingerprint, the images' physical scale, the OOD reference.

The run itself is :class:`leukoscope.train.trainer.Trainer` (:func:`leukoscope.train.train`);
its settings are :class:`leukoscope.train.config.TrainConfig`.

:func:`resolve_training_scale` decides the physical scale of the training images
(``meta["training_scale"]`` of the bundle: the table's µm/px, or with ``scale="estimate"`` the
red-cell estimate per source), and :func:`_fit_ood_reference` fits the out-of-distribution
reference on the run's own validation images (``meta["reference"]``,
:func:`leukoscope.evaluate.external.fit_reference`).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from leukoscope import taxonomy
from leukoscope.data import CellDataset
from leukoscope.data.splits import stratified_val_split  # noqa: F401  (evaluate/external imports it from here)
from leukoscope.train.config import SCALE_MODES

#: The OOD reference is fitted on at most this many validation images (stratified sample): it
#: wants ~10 per feature dimension (32) and costs ~20-45 ms an image on a CPU (decode, colour, forward).
OOD_REFERENCE_MAX_IMAGES = 500


# --------------------------------------------------------------------------- helpers


def classes_of(labels) -> tuple[str, ...]:
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


def _finite_or_none(v):
    return float(v) if v is not None and np.isfinite(v) else None


def resolve_training_scale(table: pd.DataFrame, scale: str = "stated", *,
                           log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """``(table, record)``: the training table with the µm/px of its images, and what the bundle records.

    ``scale="stated"``: the table's ``um_per_px`` where the reader gave one; other images
    are resized to the model input as they are (no physical scale).
    ``scale="estimate"``: where the table gives no µm/px, it is estimated from the red
    cells (:func:`leukoscope.scale_estimate.resolve_um_per_px`), pooled over up to 40
    images per ``source`` (one pool when the table has no ``source`` column). An
    implausible estimate (too few red cells, outside 0.03-0.5 µm/px) is not used: those
    images are resized as with ``"stated"``, and a warning says so.

    ``record``: ``{"scale", "sources": {source: {"um_per_px", "origin", "n_images"}},
    "estimates": {source: ScaleEstimate as a dict}, "warnings"}``.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {', '.join(SCALE_MODES)}, got {scale!r}")
    table = table.reset_index(drop=True)
    record: dict = {"scale": scale, "sources": {}, "estimates": {}, "warnings": []}
    um = np.full(len(table), np.nan)
    if "um_per_px" in table:
        um = pd.to_numeric(table["um_per_px"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    origin = np.where(np.isfinite(um) & (um > 0), "table", "unknown")
    if scale == "estimate":
        from leukoscope.scale_estimate import resolve_um_per_px

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rs = resolve_um_per_px(table, estimate="group", group_col="source")
        record["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        table = table.copy()
        table["um_per_px"] = um = rs.um_per_px
        origin = rs.origin
        for g, e in rs.estimates.items():
            record["estimates"][g] = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in e.items()}
            if e["plausible"]:
                log(f"scale of source {g!r}: estimated {e['um_per_px']:.4f} µm/px from {e['n_rbc']} red cells "
                    f"in {e['n_images']} images")
        for w in record["warnings"]:
            warnings.warn(w, RuntimeWarning, stacklevel=3)
            log(f"warning: {w}")
    groups = table["source"].astype(str).to_numpy() if "source" in table else np.array(["all"] * len(table))
    for g in pd.unique(groups):
        sel = groups == g
        known = um[sel][np.isfinite(um[sel])]
        record["sources"][str(g)] = {"um_per_px": float(np.median(known)) if len(known) else None,
                                     "origin": sorted(set(origin[sel].tolist())), "n_images": int(sel.sum())}
    return table, record


def reference_sample(table: pd.DataFrame, max_images: int, seed: int = 0) -> pd.DataFrame:
    """``table`` itself, or a class-stratified random sample of about ``max_images`` of its rows (in table order)."""
    if len(table) <= max_images:
        return table
    return table.groupby("label", group_keys=False).sample(frac=max_images / len(table), random_state=seed).sort_index()


def _fit_ood_reference(model, meta: dict, bundle_path: Path, val_table: pd.DataFrame, device,
                       log: Callable[[str], None], seed: int = 0) -> dict | None:
    """The OOD reference of the trained model on its validation images, or ``None`` with a warning.

    At most :data:`OOD_REFERENCE_MAX_IMAGES` images (a stratified sample), brought to the
    model as in training (the table's µm/px, nothing re-estimated). Any failure (e.g.
    fewer than 10 validation images) is reported and the run goes on: the bundle is
    already written.
    """
    from leukoscope.evaluate.external import fit_reference
    from leukoscope.models.bundle import ModelBundle

    t0 = time.time()
    val_table = reference_sample(val_table, OOD_REFERENCE_MAX_IMAGES, seed)
    try:
        bundle = ModelBundle(model, meta, path=str(bundle_path), device=str(device))
        ref = fit_reference(bundle, val_table, estimate_scale="off")
    except Exception as exc:  # noqa: BLE001  (the reference is optional; the model is saved)
        msg = (f"no out-of-distribution reference stored in {bundle_path}: fitting it on the {len(val_table)} "
               f"validation images failed ({type(exc).__name__}: {exc}); 'leukoscope evaluate --fit-reference "
               "DATA' can add one later")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log(f"warning: {msg}")
        return None
    log(f"out-of-distribution reference: {ref['n']} validation images, {ref['dims']} feature dimensions "
        f"({time.time() - t0:.1f}s)")
    return ref
