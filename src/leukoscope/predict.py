"""Batched inference from a model bundle over files and folders.

>>> from leukoscope.models import load_bundle
>>> from leukoscope.predict import predict_paths
>>> result = predict_paths(load_bundle("runs/pbc/model.safetensors"), ["cells/"])   # doctest: +SKIP
>>> result.table.columns[:4].tolist()                                                # doctest: +SKIP
['path', 'pred', 'p_blast', 'p_atypical']

Unreadable images are reported in ``result.errors`` and skipped; they never end the run.
With a bundle that stores an out-of-distribution reference, each image also gets ``ood_score`` and
``ood_flag`` (:func:`leukoscope.models.ood.score_cells`) and ``result.ood`` sums them up, with the
shift warning when too many look unlike the training data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from leukoscope.data.readers import as_path_list, iter_image_paths
from leukoscope.evaluate.predictions import predictions_table
from leukoscope.imaging.scale_policy import ScalePolicy, check_um_per_px
from leukoscope.models.inference import forward, nonfinite_errors
from leukoscope.models.ood import (NO_REFERENCE_NOTE, CellScores, colour_basis, ood_summary, prepare_images,
                                   score_cells)
from leukoscope.progress import tqdm

PREDICT_COLUMNS = ["path", "pred", "p_blast", "p_atypical"]
#: Last columns of a prediction table when the bundle stores an OOD reference: per-image score (1.0 = the threshold)
#: and flag (:func:`leukoscope.models.ood.score_cells`); a bundle without one gets neither, and ``result.ood`` says so.
OOD_COLUMNS = ["ood_score", "ood_flag"]


@dataclass
class PredictResult:
    table: pd.DataFrame                      # path,pred,p_blast,p_atypical,prob_<CLASS>...
    errors: list[dict] = field(default_factory=list)   # [{"path", "reason"}]
    scale: dict = field(default_factory=dict)          # how the inputs' µm/px was obtained
    ood: dict = field(default_factory=dict)            # ood_summary of all images (+ "warning"), or a "note"


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


def predict_paths(bundle, inputs: str | os.PathLike | Iterable[str | os.PathLike], um_per_px: float | str | None = None,
                  batch_size: int = 64, calibrated: bool = True, progress: bool = False,
                  chunk: int = 512, tta: bool = False) -> PredictResult:
    """Predict every image under ``inputs`` (one path, or a list of files or folders) with ``bundle``.

    ``um_per_px`` is the scale of the input images when known (then they are resampled to
    the model's scale; an implausible value raises ``ValueError``, see
    :func:`~leukoscope.imaging.scale_policy.check_um_per_px`); ``"estimate"`` measures it from the red cells,
    pooled per input
    (:func:`estimate_input_scale`), which is also the default for a model trained on estimated
    scales (``training_scale.scale == "estimate"``); otherwise each image is resized to the model
    input. ``tta``: probabilities averaged over the 8 rotations by 90° and mirror images of each
    image (:meth:`~leukoscope.models.bundle.ModelBundle.predict_proba`). With a bundle that stores an
    out-of-distribution reference the table ends with :data:`OOD_COLUMNS` (the plain view's features
    and the original image's colour against it) and ``result.ood`` is their
    :func:`~leukoscope.models.ood.ood_summary`; without one, ``result.ood`` holds a ``note``.
    """
    inputs = as_path_list(inputs)
    if um_per_px is not None and not (isinstance(um_per_px, str) and um_per_px == "estimate"):
        um_per_px = check_um_per_px(um_per_px, "predict_paths(um_per_px=...) (a number, 'estimate' or None)")
    paths = expand_inputs(inputs)
    estimate = um_per_px == "estimate" or (um_per_px is None and _trained_on_estimated_scale(bundle))
    policy = ScalePolicy(given=None if isinstance(um_per_px, str) else um_per_px,
                         estimate="group" if estimate else "off")
    per_path, scale = input_scale(inputs, [p for p in paths if Path(p).exists()], policy)
    errors: list[dict] = []
    good: list[str] = []
    parts: list[np.ndarray] = []
    check = bool(bundle.meta.get("reference"))
    ood_parts: list[CellScores] = []
    bar = None
    if progress:
        bar = tqdm(total=len(paths), desc="predicting", unit="img")
    for start in range(0, len(paths), chunk):
        names = [str(p) for p in paths[start:start + chunk]]
        x, ok, errs, *col = prepare_images(bundle, names, [per_path.get(n) for n in names], colour=check,
                                           colour_on=colour_basis(bundle.meta.get("reference")))
        errors.extend(errs)
        if ok:
            out = forward(bundle, x, batch_size=batch_size, tta=tta, features=check,
                          backend=getattr(bundle, "backend", "auto"))
            p = out.probabilities(bundle.temperature if calibrated else 1.0)
            finite, bad = nonfinite_errors(p, [names[i] for i in ok])  # never a call: an error
            errors.extend(bad)
            parts.append(p[finite])
            if check:
                sc = score_cells(bundle, out.features, col[0])
                ood_parts.append(CellScores(sc.score[finite], sc.flag[finite], sc.threshold))
            good.extend(names[i] for i, f in zip(ok, finite) if f)
        if bar is not None:
            bar.update(len(names))
    if bar is not None:
        bar.close()
    probs = np.concatenate(parts) if parts else np.zeros((0, len(bundle.classes)))
    table = predictions_table(good, probs, bundle.classes)
    if check:
        score = np.concatenate([o.score for o in ood_parts]) if ood_parts else np.zeros(0)
        table["ood_score"], table["ood_flag"] = score, score > 1.0
        threshold = ood_parts[0].threshold if ood_parts else None
        ood = ood_summary(table["ood_flag"].to_numpy(), score, threshold)
    else:
        ood = {"note": NO_REFERENCE_NOTE, "warning": None}
    return PredictResult(table, errors, scale, ood)
