"""Multi-class metrics of a cross-validation run: the paper's Table 1 and more.

Everything starts from a predictions table (``leukoscope cv`` writes it as
``RUN/predictions.csv``): ``path, label, fold, pred, prob_<CLASS>...`` with one
probability column per class *of the model*, in taxonomy order.

* :func:`per_class_fold_metrics`: precision, sensitivity (recall), specificity and F1
  of every class in every fold (scikit-learn's ``precision_recall_fscore_support``
  and ``multilabel_confusion_matrix``). A metric whose denominator is empty in a fold
  is ``NaN`` for that fold: precision when the fold has no prediction of the class,
  sensitivity when it has no test image of it, specificity when every test image is
  of that class. Never a silent zero.
* :func:`table1`: mean and standard deviation (``ddof=1``) over the folds where the
  metric is defined, with the number of those folds, as in Matek et al. (2019), Table 1.
* :func:`classification_metrics`: the one metrics table of a set of calls (``n``, accuracy,
  balanced accuracy, macro-F1): what training reports on its validation images and
  cross-validation per fold and overall.
* :func:`overall_metrics` / :func:`bootstrap_ci`: macro-F1, balanced accuracy,
  accuracy and per-class F1 over all test predictions, with percentile bootstrap
  confidence intervals (images resampled with replacement, seeded).
* :func:`confusion_fractions`: the confusion matrix with rows normalised to fractions.

>>> import pandas as pd
>>> df = pd.DataFrame({"path": list("abcd"), "label": ["LYT", "LYT", "NGS", "NGS"],
...                    "fold": [0, 1, 0, 1], "pred": ["LYT", "NGS", "NGS", "NGS"]})
>>> t = table1(df, ["LYT", "NGS"])
>>> t.loc[t["class"] == "NGS", "precision_mean"].item()
0.75
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

from leukoscope import taxonomy
from leukoscope.evaluate.agreement import EXAMINERS, agreement

PROB_PREFIX = "prob_"
TABLE1_METRICS = ("precision", "sensitivity", "specificity")
REQUIRED_COLUMNS = ("path", "label", "pred")


# --------------------------------------------------------------------------- input

def model_classes(pred_df: pd.DataFrame) -> list[str]:
    """The model's classes, read from the ``prob_<CLASS>`` columns (taxonomy order checked)."""
    classes = [c[len(PROB_PREFIX):] for c in pred_df.columns if c.startswith(PROB_PREFIX)]
    for c in classes:
        taxonomy.check_class(c)
    order = sorted(classes, key=taxonomy.class_index)
    if classes != order:
        raise ValueError(f"prob_ columns are not in taxonomy order: {classes}; expected {order}")
    return classes


def report_classes(pred_df: pd.DataFrame, classes_of_model=None) -> list[str]:
    """Classes a report covers: the union of gold labels and model classes, in taxonomy order."""
    if classes_of_model is None:
        classes_of_model = model_classes(pred_df)
    present = set(pred_df["label"]) | set(classes_of_model) | set(pred_df["pred"])
    return [c for c in taxonomy.CLASSES if c in present]


def validate_predictions(pred_df: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Check a predictions table and return it with ``fold`` as int and labels as str.

    Raises ``ValueError`` with a message that says what is wrong and what to do.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in pred_df.columns]
    if "label" in missing:
        raise ValueError(f"{source}: no 'label' column; a report needs gold labels, as in the "
                         "predictions.csv of a `leukoscope cv` run (path,label,fold,pred,prob_<CLASS>...)")
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; expected path,label,fold,pred,prob_<CLASS>...")
    if len(pred_df) == 0:
        raise ValueError(f"{source}: no rows")
    df = pred_df.copy()
    df["label"] = df["label"].astype(str)
    df["pred"] = df["pred"].astype(str)
    df["path"] = df["path"].astype(str)
    if "fold" not in df.columns:
        df["fold"] = 0
    if df["fold"].isna().any():
        raise ValueError(f"{source}: {int(df['fold'].isna().sum())} rows have no fold")
    df["fold"] = df["fold"].astype(int)
    bad = sorted(set(df["label"]) - set(taxonomy.CLASSES))
    if bad:
        raise ValueError(f"{source}: unknown gold labels {bad}; expected taxonomy classes {', '.join(taxonomy.CLASSES)}")
    classes = model_classes(df)
    if not classes:
        raise ValueError(f"{source}: no prob_<CLASS> columns")
    badp = sorted(set(df["pred"]) - set(classes))
    if badp:
        raise ValueError(f"{source}: predictions {badp} are not among the model's classes {classes}")
    cols = [PROB_PREFIX + c for c in classes]
    for col in cols:
        df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="coerce")
    bad_rows = ~np.isfinite(df[cols].to_numpy(dtype=np.float64)).all(axis=1)
    if bad_rows.any():
        raise ValueError(f"{source}: {int(bad_rows.sum())} rows hold missing or non-numeric probabilities "
                         f"(first: {df.loc[bad_rows, 'path'].iloc[0]})")
    return df


def read_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``predictions.csv``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: predictions file not found (run `leukoscope cv` first)")
    df = pd.read_csv(path, dtype={"path": str, "label": str, "pred": str}, keep_default_na=False,
                     na_values={"fold": [""]})
    return validate_predictions(df, str(path))


def probabilities(pred_df: pd.DataFrame, classes=None) -> np.ndarray:
    """``(n, n_model_classes)`` probability matrix in the order of ``classes`` (default: the model's)."""
    classes = model_classes(pred_df) if classes is None else list(classes)
    return pred_df[[PROB_PREFIX + c for c in classes]].to_numpy(dtype=np.float64)


def path_key(path: str) -> str:
    """The last two path components, ``CLASS/CLASS_NNNN.tiff``: how images are matched across files."""
    parts = [p for p in re.split(r"[\\/]+", str(path)) if p]
    return "/".join(parts[-2:])


# --------------------------------------------------------------------------- per fold

def _nan_div(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_fold_metrics(pred_df: pd.DataFrame, classes=None) -> pd.DataFrame:
    """Precision, sensitivity, specificity and F1 of each class in each fold.

    Returns a long table ``fold, class, n_true, n_pred, tp, fp, fn, tn, precision,
    sensitivity, specificity, f1``; a metric is ``NaN`` in a fold where its denominator
    is zero (see the module docstring).
    """
    if classes is None:
        classes = report_classes(pred_df)
    classes = list(classes)
    rows = []
    for fold, sub in pred_df.groupby("fold", sort=True):
        y, p = sub["label"].to_numpy(), sub["pred"].to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            prec, rec, f1, support = precision_recall_fscore_support(
                y, p, labels=classes, average=None, zero_division=np.nan)
        mcm = multilabel_confusion_matrix(y, p, labels=classes)  # (K, 2, 2): [[tn, fp], [fn, tp]]
        tn, fp, fn, tp = mcm[:, 0, 0], mcm[:, 0, 1], mcm[:, 1, 0], mcm[:, 1, 1]
        spec = _nan_div(tn, tn + fp)
        for k, c in enumerate(classes):
            rows.append({
                "fold": int(fold), "class": c, "n_true": int(support[k]), "n_pred": int(tp[k] + fp[k]),
                "tp": int(tp[k]), "fp": int(fp[k]), "fn": int(fn[k]), "tn": int(tn[k]),
                "precision": float(prec[k]), "sensitivity": float(rec[k]),
                "specificity": float(spec[k]), "f1": float(f1[k]),
            })
    return pd.DataFrame(rows)


def table1(pred_df: pd.DataFrame, classes=None, fold_metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1 of the paper: per class, the mean and sd over folds of precision, sensitivity, specificity.

    Columns: ``class, name, n_images, precision_mean, precision_sd, sensitivity_mean,
    sensitivity_sd, specificity_mean, specificity_sd``, then ``group``, ``n_folds`` and
    ``<metric>_folds`` (folds where the metric is defined; mean and sd are over those,
    sd with ``ddof=1``, so it is ``NaN`` with fewer than two).
    """
    if classes is None:
        classes = report_classes(pred_df)
    fm = per_class_fold_metrics(pred_df, classes) if fold_metrics is None else fold_metrics
    n_folds = int(fm["fold"].nunique())
    rows = []
    for c in classes:
        sub = fm[fm["class"] == c]
        row = {"class": c, "name": taxonomy.CLASS_NAMES[c], "n_images": int(sub["n_true"].sum())}
        extra = {}
        for m in TABLE1_METRICS:
            vals = sub[m].dropna()
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{m}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
            extra[f"{m}_folds"] = int(len(vals))
        row["group"] = taxonomy.group_of(c)
        row["n_folds"] = n_folds
        row.update(extra)
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- pooled

def confusion_fractions(pred_df: pd.DataFrame, classes=None) -> pd.DataFrame:
    """Confusion matrix over all folds, rows = gold label normalised to fractions.

    Index ``gold`` (the classes), columns ``n_images`` then one column per class; a row
    with no images is ``NaN``.
    """
    if classes is None:
        classes = report_classes(pred_df)
    cm = confusion_matrix(pred_df["label"], pred_df["pred"], labels=list(classes))
    n = cm.sum(axis=1)
    frac = _nan_div(cm, n[:, None])
    out = pd.DataFrame(frac, index=pd.Index(classes, name="gold"), columns=list(classes))
    out.insert(0, "n_images", n.astype(int))
    return out


def _codes(pred_df: pd.DataFrame, classes) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    try:
        y = pred_df["label"].map(index).to_numpy(dtype=np.int64)
        p = pred_df["pred"].map(index).to_numpy(dtype=np.int64)
    except (ValueError, TypeError):  # NaN from map: a label outside `classes`
        raise ValueError(f"labels or predictions outside the classes {list(classes)}") from None
    return y, p


def bootstrap_confusions(y_idx, p_idx, n_classes: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Confusion matrices of ``n_boot`` bootstrap resamples of the images: ``(n_boot, K, K)``.

    Resampling ``n`` images with replacement and counting (gold, pred) pairs gives
    confusion counts distributed exactly as ``Multinomial(n, observed cell fractions)``;
    drawing those counts directly is the same bootstrap at ``O(n_boot * K^2)`` cost, so
    1000 resamples of any number of rows take milliseconds.
    """
    y_idx = np.asarray(y_idx, dtype=np.int64)
    p_idx = np.asarray(p_idx, dtype=np.int64)
    k = int(n_classes)
    n = len(y_idx)
    if n == 0:
        raise ValueError("bootstrap of an empty set of predictions")
    counts = np.bincount(y_idx * k + p_idx, minlength=k * k).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=int(n_boot))
    return draws.reshape(int(n_boot), k, k)


def metrics_from_confusions(cms: np.ndarray, labels_mask=None) -> dict[str, np.ndarray]:
    """Vectorised metrics of a stack of confusion matrices ``(..., K, K)`` (rows gold).

    ``labels_mask`` (K,) picks the classes that macro-F1 averages over (default: all).
    Returns ``f1`` (..., K) with ``NaN`` where a class is neither present nor predicted,
    ``macro_f1`` (NaN-skipping mean over the masked classes, as scikit-learn's
    ``f1_score(..., zero_division=np.nan)``), ``balanced_accuracy`` (mean recall over
    classes present in that matrix, as ``balanced_accuracy_score``) and ``accuracy``.
    """
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support = cms.sum(axis=-1)
    predicted = cms.sum(axis=-2)
    f1 = _nan_div(2 * tp, support + predicted)
    recall = _nan_div(tp, support)
    mask = np.ones(cms.shape[-1], bool) if labels_mask is None else np.asarray(labels_mask, bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        macro_f1 = np.nanmean(f1[..., mask], axis=-1)
        bal = np.nanmean(recall, axis=-1)
    total = cms.sum(axis=(-2, -1))
    acc = _nan_div(tp.sum(axis=-1), total)
    return {"f1": f1, "macro_f1": macro_f1, "balanced_accuracy": bal, "accuracy": acc}


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return float(lo), float(hi)


def bootstrap_ci(y_true, y_pred, classes, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of macro-F1, balanced accuracy, accuracy and per-class F1.

    ``y_true``, ``y_pred``: class labels; ``classes``: every label that can occur.
    Macro-F1 averages over the classes with at least one gold image. Returns
    ``{"macro_f1": {"lo", "hi"}, "balanced_accuracy": ..., "accuracy": ...,
    "f1": {class: {"lo", "hi"}}, "n_boot", "seed", "level"}``.
    """
    classes = list(classes)
    df = pd.DataFrame({"label": np.asarray(y_true, dtype=str), "pred": np.asarray(y_pred, dtype=str)})
    y, p = _codes(df, classes)
    cms = bootstrap_confusions(y, p, len(classes), n_boot=n_boot, seed=seed)
    present = np.bincount(y, minlength=len(classes)) > 0
    m = metrics_from_confusions(cms, present)
    out: dict = {"n_boot": int(n_boot), "seed": int(seed), "level": float(level)}
    for key in ("macro_f1", "balanced_accuracy", "accuracy"):
        lo, hi = _interval(m[key], level)
        out[key] = {"lo": lo, "hi": hi}
    out["f1"] = {}
    for k, c in enumerate(classes):
        lo, hi = _interval(m["f1"][:, k], level)
        out["f1"][c] = {"lo": lo, "hi": hi}
    return out


def overall_metrics(pred_df: pd.DataFrame, classes=None, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Macro-F1, balanced accuracy, accuracy and per-class F1 over all test predictions, with CIs.

    Point estimates are scikit-learn's (``f1_score`` over the classes with gold images,
    ``balanced_accuracy_score``, ``accuracy_score``); intervals from :func:`bootstrap_ci`
    (``n_boot=0`` skips them).
    """
    if classes is None:
        classes = report_classes(pred_df)
    classes = list(classes)
    y, p = pred_df["label"].to_numpy(), pred_df["pred"].to_numpy()
    gold_classes = [c for c in classes if c in set(y)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        point = {
            "macro_f1": float(f1_score(y, p, labels=gold_classes, average="macro", zero_division=np.nan)),
            "balanced_accuracy": float(balanced_accuracy_score(y, p)),
            "accuracy": float(accuracy_score(y, p)),
        }
        f1 = f1_score(y, p, labels=classes, average=None, zero_division=np.nan)
    out: dict = {"n": int(len(pred_df)), "classes_averaged": gold_classes}
    ci = bootstrap_ci(y, p, classes, n_boot=n_boot, seed=seed, level=level) if n_boot > 0 else None
    for key, val in point.items():
        out[key] = {"value": val, **(ci[key] if ci else {"lo": float("nan"), "hi": float("nan")})}
    out["f1"] = {}
    for k, c in enumerate(classes):
        interval = ci["f1"][c] if ci else {"lo": float("nan"), "hi": float("nan")}
        out["f1"][c] = {"value": float(f1[k]), **interval}
    out["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
                        "method": "percentile; images resampled with replacement"}
    return out


def classification_metrics(y_true, y_pred, labels=None) -> dict:
    """``{"n", "accuracy", "balanced_accuracy", "macro_f1"}`` of calls ``y_pred`` against ``y_true``.

    Point estimates only (scikit-learn's). ``labels``: the classes macro-F1 averages over
    (default: every class in ``y_true`` or ``y_pred``); a class with no gold image and no call
    counts as F1 0 (``zero_division=0``). An empty set gives ``{}``.

    >>> classification_metrics(["LYT", "LYT", "NGS"], ["LYT", "NGS", "NGS"])["balanced_accuracy"]
    0.75
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"n": int(len(y_true)), "accuracy": float((y_true == y_pred).mean()),
                "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
                "macro_f1": float(f1_score(y_true, y_pred, labels=None if labels is None else list(labels),
                                           average="macro", zero_division=0))}


# --------------------------------------------------------------------------- model vs examiners

def _kappa(a, b) -> float:
    a, b = list(a), list(b)
    if len(a) < 2 or len(set(a) | set(b)) < 2:
        return float("nan")
    return float(cohen_kappa_score(a, b))


def model_vs_examiners(pred_df: pd.DataFrame, annotations: pd.DataFrame) -> dict:
    """The model's Cohen's kappa with the gold labels beside each examiner's, on the same images.

    ``annotations``: ``path, gold, reannotation1, reannotation2`` (as
    :func:`leukoscope.data.read_annotations` returns). Images are matched on the last two
    path components (``CLASS/CLASS_NNNN.tiff``). For each examiner, over the matched
    images that examiner re-annotated: ``n``, ``n_unc``, the examiner's ``kappa`` (images
    the examiner could assign) and ``kappa_unc_as_error`` (all ``n``, from
    :func:`leukoscope.evaluate.agreement.agreement`), the model's ``model_kappa`` on the
    same assignable images and ``model_kappa_all`` on all ``n``. Without matches, ``note``
    says so and ``examiners`` is empty.
    """
    pkeys = pred_df["path"].map(path_key)
    pred = pd.DataFrame({"key": pkeys, "label": pred_df["label"].to_numpy(), "pred": pred_df["pred"].to_numpy()})
    n_dup = int(pred["key"].duplicated().sum())
    pred = pred.drop_duplicates("key", keep="first")
    ann = annotations.assign(key=annotations["path"].map(path_key)).drop_duplicates("key", keep="first")
    matched = ann.merge(pred, on="key", how="inner")
    out: dict = {"n_predictions": int(len(pred_df)), "n_annotated": int(len(ann)), "n_matched": int(len(matched)),
                 "match_on": "last two path components (CLASS/FILE)", "examiners": {}}
    notes = []
    if n_dup:
        notes.append(f"{n_dup} predictions share a CLASS/FILE key with another; the first of each was used")
    if matched.empty:
        notes.append(f"none of the {len(pred_df)} images in the predictions was re-annotated: no "
                     f"CLASS/FILE key of predictions.csv occurs among the {len(ann)} images of the annotation file")
        out["note"] = "; ".join(notes)
        return out
    mismatch = int((matched["gold"] != matched["label"]).sum())
    out["n_gold_label_mismatch"] = mismatch
    if mismatch:
        notes.append(f"{mismatch} matched images have a different gold label in the annotation file than in "
                     "predictions.csv; the annotation file's gold label is the reference here")
    for col in EXAMINERS:
        if col not in matched:
            continue
        sub = matched[matched[col] != taxonomy.NOT_ANNOTATED]
        if sub.empty:
            out["examiners"][col] = {"n": 0, "note": "no predicted image was re-annotated by this examiner"}
            continue
        r = agreement(sub[["path", "gold", col]])[col]
        assignable = sub[sub[col] != taxonomy.UNCERTAIN]
        out["examiners"][col] = {
            "n": r["n"], "n_unc": r["n_unc"], "n_assignable": r["n_assignable"],
            "kappa": r["kappa"], "kappa_unc_as_error": r["kappa_unc_as_error"], "accuracy": r["accuracy"],
            "model_kappa": _kappa(assignable["gold"], assignable["pred"]),
            "model_kappa_all": _kappa(sub["gold"], sub["pred"]),
            "model_accuracy": float((assignable["gold"] == assignable["pred"]).mean())
            if len(assignable) else float("nan"),
        }
    if notes:
        out["note"] = "; ".join(notes)
    return out
