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

from leukoscope import taxonomy
from leukoscope.images import ImageError, load_rgb

PREDICT_COLUMNS = ["path", "pred", "p_blast", "p_atypical"]


@dataclass
class PredictResult:
    table: pd.DataFrame                      # path,pred,p_blast,p_atypical,prob_<CLASS>...
    errors: list[dict] = field(default_factory=list)   # [{"path", "reason"}]


def predictions_table(paths: Sequence, probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """``path,pred,p_blast,p_atypical,prob_<CLASS>...`` (classes of the model, taxonomy order)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(paths), len(classes))
    df = pd.DataFrame({"path": [str(p) for p in paths]})
    df["pred"] = np.array(classes, dtype=object)[probs.argmax(1)] if len(df) else pd.Series(dtype=object)
    df["p_blast"] = taxonomy.binary_scores(probs, classes, "blast")
    df["p_atypical"] = taxonomy.binary_scores(probs, classes, "atypical")
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, j]
    return df


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded recursively to their image files (sorted)."""
    from leukoscope.data.readers import iter_image_paths

    return iter_image_paths(inputs)


def predict_paths(bundle, inputs: Iterable[str | os.PathLike], um_per_px: float | None = None,
                  batch_size: int = 64, calibrated: bool = True, progress: bool = False,
                  chunk: int = 512) -> PredictResult:
    """Predict every image under ``inputs`` (files or folders) with ``bundle``.

    ``um_per_px`` is the scale of the input images when known (then they are resampled to
    the model's scale); otherwise each image is resized to the model input.
    """
    paths = expand_inputs(inputs)
    errors: list[dict] = []
    good: list[str] = []
    parts: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="predicting", unit="img")
    for start in range(0, len(paths), chunk):
        block, names = [], []
        for p in paths[start:start + chunk]:
            try:
                if not Path(p).exists():
                    raise ImageError(p, "file not found")
                block.append(bundle.prepare([load_rgb(p)], um_per_px)[0])
                names.append(str(p))
            except (ImageError, ValueError, OSError) as exc:
                errors.append({"path": str(p), "reason": getattr(exc, "reason", str(exc))})
        if block:
            import torch

            probs = bundle.predict_proba(torch.from_numpy(np.stack(block)), batch_size=batch_size,
                                         calibrated=calibrated)
            parts.append(probs)
            good.extend(names)
        if bar is not None:
            bar.update(len(paths[start:start + chunk]))
    if bar is not None:
        bar.close()
    probs = np.concatenate(parts) if parts else np.zeros((0, len(bundle.classes)))
    return PredictResult(predictions_table(good, probs, bundle.classes), errors)
