"""Calibration: fitting a temperature, and the expected calibration error with reliability bins.

:func:`fit_temperature` finds the temperature ``T`` of ``softmax(logits / T)`` that minimises the
negative log-likelihood on held-out images (Guo et al., ICML 2017); training fits it on the
validation images and stores it in the bundle.

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

import math

import numpy as np
import pandas as pd
import torch

from leukoscope.evaluate.metrics import PROB_PREFIX, model_classes


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T); 1.0 when none is sensible."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.01 < t < 100 else 1.0


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
