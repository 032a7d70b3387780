"""Calibration of the top-label probability: expected calibration error and reliability bins.

The confidence of a prediction is the probability the model gave its predicted class;
it is correct when that class is the gold label. Predictions are put into
``n_bins`` equal-width confidence bins; the expected calibration error (Guo et al.,
ICML 2017) is the image-weighted mean of ``|accuracy - mean confidence|`` over bins.

>>> import numpy as np
>>> r = expected_calibration_error(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 1, 1, 0]), n_bins=10)
>>> round(r["ece"], 3)
0.1
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from leukoscope.evaluate.metrics import PROB_PREFIX, model_classes


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> dict:
    """ECE and the reliability table of confidences in [0, 1] and 0/1 correctness.

    Returns ``{"ece", "mce", "n", "n_bins", "bins": [{"lo", "hi", "n", "confidence",
    "accuracy"}]}``; ``confidence`` and ``accuracy`` are ``NaN`` for an empty bin.
    ``mce`` is the largest gap over non-empty bins.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape or conf.ndim != 1:
        raise ValueError("confidence and correct must be 1-d arrays of the same length")
    if len(conf) == 0:
        raise ValueError("no predictions to calibrate")
    if np.any((conf < 0) | (conf > 1) | ~np.isfinite(conf)):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    # bins are (lo, hi], the first one [0, hi]
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_ok = np.bincount(idx, weights=ok, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(n > 0, sum_conf / n, np.nan)
        acc = np.where(n > 0, sum_ok / n, np.nan)
    gap = np.abs(acc - mean_conf)
    filled = n > 0
    ece = float(np.sum(n[filled] * gap[filled]) / len(conf))
    bins = [{"lo": float(edges[i]), "hi": float(edges[i + 1]), "n": int(n[i]),
             "confidence": float(mean_conf[i]), "accuracy": float(acc[i])} for i in range(n_bins)]
    return {"ece": ece, "mce": float(gap[filled].max()), "n": int(len(conf)), "n_bins": int(n_bins),
            "mean_confidence": float(conf.mean()), "accuracy": float(ok.mean()), "bins": bins}


def top_label_confidence(pred_df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (probability of the predicted class) and correctness of each prediction."""
    classes = model_classes(pred_df)
    probs = pred_df[[PROB_PREFIX + c for c in classes]].to_numpy(dtype=np.float64)
    col = pred_df["pred"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    conf = probs[np.arange(len(probs)), col]
    correct = (pred_df["pred"].to_numpy() == pred_df["label"].to_numpy())
    return np.clip(conf, 0.0, 1.0), correct


def calibration_of_predictions(pred_df: pd.DataFrame, n_bins: int = 15) -> dict:
    """:func:`expected_calibration_error` of a predictions table, over all folds together."""
    conf, correct = top_label_confidence(pred_df)
    return expected_calibration_error(conf, correct, n_bins=n_bins)
