"""Batched inference from a model bundle over files and folders.

>>> from leukoscope.models import load_bundle
>>> from leukoscope.predict import predict_paths
>>> result = predict_paths(load_bundle("runs/pbc/model.safetensors"), ["cells/"])   # doctest: +SKIP
>>> result.table.columns[:4].tolist()                                                # doctest: +SKIP
['path', 'pred', 'p_blast', 'p_atypical']

Unreadable images are reported in ``result.errors`` and skipped; they never end the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from leukoscope.data.readers import iter_image_paths
from leukoscope.evaluate.predictions import predictions_table
from leukoscope.imaging.scale_policy import ScalePolicy
from leukoscope.models.inference import prepare_many
from leukoscope.progress import tqdm

PREDICT_COLUMNS = ["path", "pred", "p_blast", "p_atypical"]


@dataclass
class PredictResult:
    table: pd.DataFrame                      # path,pred,p_blast,p_atypical,prob_<CLASS>...
    errors: list[dict] = field(default_factory=list)   # [{"path", "reason"}]
    scale: dict = field(default_factory=dict)          # how the inputs' µm/px was obtained


def _trained_on_estimated_scale(bundle) -> bool:
    return (bundle.meta.get("training_scale") or {}).get("scale") == "estimate"


def input_scale(inputs: Iterable[str | os.PathLike], paths: Sequence[Path], policy: ScalePolicy
                ) -> tuple[dict, dict]:
    """µm/px per image by the scale ``policy``; an estimate pools the red cells per input (a folder given
    on the command line is one source; single files are pooled per parent folder):
    ``({path: µm/px or None}, record)`` (:class:`~leukoscope.imaging.scale_policy.ScaleRecord` as a dict)."""
    roots = [Path(i).resolve() for i in inputs if Path(i).is_dir()]

    def source(p: Path) -> str:
        rp = p.resolve()
        for r in roots:
            if rp.is_relative_to(r):
                return str(r)
        return str(rp.parent)

    table = pd.DataFrame({"path": [str(p) for p in paths], "source": [source(Path(p)) for p in paths]})
    um, _, rec = policy.resolve(table, reemit=True)
    return {p: (float(u) if np.isfinite(u) else None) for p, u in zip(table["path"], um)}, rec.to_dict()


def estimate_input_scale(inputs: Iterable[str | os.PathLike], paths: Sequence[Path]) -> tuple[dict, dict]:
    """µm/px per image from the red cells, pooled per input: :func:`input_scale` with an estimating policy."""
    return input_scale(inputs, paths, ScalePolicy(estimate="group"))


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded recursively to their image files (sorted)."""
    return iter_image_paths(inputs)


def predict_paths(bundle, inputs: Iterable[str | os.PathLike], um_per_px: float | str | None = None,
                  batch_size: int = 64, calibrated: bool = True, progress: bool = False,
                  chunk: int = 512, tta: bool = False) -> PredictResult:
    """Predict every image under ``inputs`` (files or folders) with ``bundle``.

    ``um_per_px`` is the scale of the input images when known (then they are resampled to
    the model's scale); ``"estimate"`` measures it from the red cells, pooled per input
    (:func:`estimate_input_scale`), which is also the default for a model trained on estimated
    scales (``training_scale.scale == "estimate"``); otherwise each image is resized to the model
    input. ``tta``: probabilities averaged over the 8 rotations by 90° and mirror images of each
    image (:meth:`~leukoscope.models.bundle.ModelBundle.predict_proba`).
    """
    inputs = list(inputs)
    paths = expand_inputs(inputs)
    if isinstance(um_per_px, str) and um_per_px != "estimate":
        raise ValueError(f"um_per_px must be a number, 'estimate' or None, got {um_per_px!r}")
    estimate = um_per_px == "estimate" or (um_per_px is None and _trained_on_estimated_scale(bundle))
    policy = ScalePolicy(given=None if isinstance(um_per_px, str) else um_per_px,
                         estimate="group" if estimate else "off")
    per_path, scale = input_scale(inputs, [p for p in paths if Path(p).exists()], policy)
    errors: list[dict] = []
    good: list[str] = []
    parts: list[np.ndarray] = []
    bar = None
    if progress:
        bar = tqdm(total=len(paths), desc="predicting", unit="img")
    for start in range(0, len(paths), chunk):
        names = [str(p) for p in paths[start:start + chunk]]
        batch = prepare_many(bundle, names, [per_path.get(n) for n in names])
        errors.extend(batch.errors)
        if batch.ok:
            parts.append(bundle.predict_proba_prepared(batch.x, batch_size=batch_size, calibrated=calibrated,
                                                       tta=tta))
            good.extend(names[i] for i in batch.ok)
        if bar is not None:
            bar.update(len(names))
    if bar is not None:
        bar.close()
    probs = np.concatenate(parts) if parts else np.zeros((0, len(bundle.classes)))
    return PredictResult(predictions_table(good, probs, bundle.classes), errors, scale)
