"""The two clinical questions of Matek et al. (2019, Fig. 3b,c) asked of the class probabilities.

*Blast*: is the cell a myeloblast or monoblast? score = P(MYO) + P(MOB).
*Atypical*: is it one of the cells not expected in a healthy peripheral smear?
score = sum of P over :data:`leukoscope.taxonomy.ATYPICAL`. Classes the model does not
know contribute 0 (:func:`leukoscope.taxonomy.binary_scores`).

:func:`binary_roc_over_folds` gives, per fold, scikit-learn's ``roc_curve`` and
``roc_auc_score``; the mean curve interpolates each fold's TPR on a common FPR grid,
with the standard deviation over folds as a band, and AUC as mean +- sd over folds.
A question without positive (or negative) images, in the data or in a fold, is
*undefined* there: the result says why (``undefined_reason``) and holds no curve.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from leukoscope import taxonomy
from leukoscope.evaluate.agreement import binary_sens_spec
from leukoscope.evaluate.metrics import model_classes, probabilities

#: Common false-positive-rate grid on which fold curves are averaged.
FPR_GRID = np.linspace(0.0, 1.0, 201)


def _undefined(n_pos: int, n_neg: int, question: str, where: str) -> str | None:
    members = " or ".join(taxonomy.BINARY_QUESTIONS[question])
    if n_pos == 0 and n_neg == 0:
        return f"no images {where}"
    if n_pos == 0:
        return f"no positive images (gold {members}) {where}"
    if n_neg == 0:
        return f"no negative images (gold other than {members}) {where}"
    return None


def binary_roc(truth, scores, grid=FPR_GRID) -> dict:
    """ROC of one set of scores: ``fpr``, ``tpr``, ``auc`` and ``tpr_grid`` (TPR interpolated on ``grid``)."""
    truth = np.asarray(truth, dtype=bool)
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=True)
    tpr_grid = np.interp(grid, fpr, tpr)
    tpr_grid[0] = 0.0  # the curve starts at (0, 0) whatever the tie structure at the top score
    return {"auc": float(roc_auc_score(truth, scores)), "fpr": fpr.tolist(), "tpr": tpr.tolist(),
            "tpr_grid": tpr_grid.tolist()}


def binary_roc_over_folds(pred_df: pd.DataFrame, question: str, classes=None, grid=FPR_GRID) -> dict:
    """ROC of a binary question for every fold, the mean curve and AUC mean +- sd.

    Returns ``{"question", "positive_classes", "n_pos", "n_neg", "auc_mean", "auc_sd",
    "n_folds_defined", "auc_pooled", "fpr_grid", "tpr_mean", "tpr_sd",
    "model_point": {"sensitivity", "specificity"} of the hard calls,
    "folds": [{"fold", "n_pos", "n_neg", "auc", "fpr", "tpr"} or {..., "undefined_reason"}],
    "undefined_reason" (only when the question is undefined overall), "note" (optional)}``.
    ``auc_sd`` uses ``ddof=1`` (``NaN`` with one defined fold).
    """
    if question not in taxonomy.BINARY_QUESTIONS:
        raise ValueError(f"unknown question {question!r}; expected one of {', '.join(taxonomy.BINARY_QUESTIONS)}")
    classes = model_classes(pred_df) if classes is None else list(classes)
    grid = np.asarray(grid, dtype=np.float64)
    scores = taxonomy.binary_scores(probabilities(pred_df, classes), classes, question)
    truth = taxonomy.binary_truth(pred_df["label"], question)
    folds_arr = pred_df["fold"].to_numpy()
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    out: dict = {
        "question": question,
        "positive_classes": list(taxonomy.BINARY_QUESTIONS[question]),
        "n_pos": n_pos, "n_neg": n_neg, "n_folds": int(len(np.unique(folds_arr))),
    }
    known = [c for c in taxonomy.BINARY_QUESTIONS[question] if c in classes]
    if not known:
        out["note"] = "the model knows none of the positive classes: its score is 0 for every image"
    elif len(known) < len(taxonomy.BINARY_QUESTIONS[question]):
        missing = [c for c in taxonomy.BINARY_QUESTIONS[question] if c not in classes]
        out["note"] = f"the model does not know {', '.join(missing)}; those classes contribute 0 to the score"
    out["model_point"] = binary_sens_spec(pred_df["label"], pred_df["pred"], question)
    reason = _undefined(n_pos, n_neg, question, "in the predictions")
    fold_results = []
    for fold in np.unique(folds_arr):
        sel = folds_arr == fold
        t, s = truth[sel], scores[sel]
        fp_, fn_ = int(t.sum()), int((~t).sum())
        fr: dict = {"fold": int(fold), "n_pos": fp_, "n_neg": fn_}
        why = _undefined(fp_, fn_, question, f"in fold {int(fold)}")
        if why:
            fr["undefined_reason"] = why
        else:
            fr.update(binary_roc(t, s, grid))
        fold_results.append(fr)
    out["folds"] = fold_results
    defined = [f for f in fold_results if "auc" in f]
    out["n_folds_defined"] = len(defined)
    if reason is None and not defined:
        reason = "no fold has both positive and negative images"
    if reason is not None:
        out.update({"undefined_reason": reason, "auc_mean": float("nan"), "auc_sd": float("nan"),
                    "auc_pooled": float("nan")})
        return out
    aucs = np.array([f["auc"] for f in defined])
    curves = np.array([f["tpr_grid"] for f in defined])
    out["auc_mean"] = float(aucs.mean())
    out["auc_sd"] = float(aucs.std(ddof=1)) if len(aucs) > 1 else float("nan")
    out["auc_pooled"] = float(roc_auc_score(truth, scores))
    out["fpr_grid"] = grid.tolist()
    out["tpr_mean"] = curves.mean(axis=0).tolist()
    out["tpr_sd"] = (curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(grid))).tolist()
    return out


def binary_questions(pred_df: pd.DataFrame, classes=None, grid=FPR_GRID) -> dict:
    """:func:`binary_roc_over_folds` for every question in :data:`leukoscope.taxonomy.BINARY_QUESTIONS`."""
    return {q: binary_roc_over_folds(pred_df, q, classes, grid) for q in taxonomy.BINARY_QUESTIONS}
