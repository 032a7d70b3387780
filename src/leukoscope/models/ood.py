"""The out-of-distribution reference of a model, and the check of other cells against it.

:func:`fit_reference` measures, on labelled in-distribution cells the model was not trained on
(a training run's validation images: :func:`fit_training_reference`), the penultimate-layer
features (Mahalanobis distance to the nearest class mean in a whitened PCA space, Lee et al.
2018), the image colour (CIELAB of light pixels and of nuclei) and the max-probability
distribution; the bundle stores it under ``meta["reference"]`` (:data:`REFERENCE_KEY`).
:func:`ood_check` compares a group of cells with it (used by ``leukoscope evaluate``, per source).

Per cell (``predict``, ``screen``, ``evaluate``): :func:`score_cells` gives each cell a score, the
largest of its feature and colour distances divided by that signal's threshold, and flags it when
the score is above 1. The thresholds are calibrated with the reference, out-of-fold on the same
validation cells, at the :data:`OOD_QUANTILE` quantile (:func:`calibrate_threshold`: the quantile,
thresholds and the measured validation false-alarm rate are stored in ``meta["reference"]["threshold"]``);
a reference without them uses :func:`fallback_threshold`, with a warning. :func:`ood_summary` sums a
group up and words the warning: "N of M cells look unlike the training data; calls are unreliable".
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import chi2
from skimage.color import rgb2lab

from leukoscope.imaging.colour import normalize_stain, reference_stats, white_balance
from leukoscope.imaging.scale_policy import ScalePolicy
from leukoscope.models.bundle import ModelBundle, load_bundle, save_bundle
from leukoscope.models.inference import forward, prepare_many

REFERENCE_KEY = "reference"
#: A source is flagged when this fraction of its cells lie beyond the reference's 95th percentile.
OOD_FRACTION = 0.25
#: ... or when its mean max-probability is this much lower than the reference's.
OOD_CONFIDENCE_DROP = 0.15
PCA_DIMS = 32
#: Per-cell flag: each signal's threshold is this quantile of its out-of-fold distances on the validation
#: cells (:func:`calibrate_threshold`): about 1-2 % of in-distribution cells flagged (measured on held-out
#: PBC cells: docs/crosslab.md, "Shift warnings").
OOD_QUANTILE = 0.99
#: Folds of the out-of-fold calibration.
OOD_FOLDS = 5
#: A run (or a field) gets the shift warning when more than this fraction of its cells are flagged
#: (or their median score is above the threshold).
OOD_WARN_FRACTION = 0.20
#: What a shift summary says when the bundle cannot be checked.
NO_REFERENCE_NOTE = "no shift check: the bundle stores no out-of-distribution reference"
#: The banner of the review pages when a run is shifted.
SHIFT_BANNER = "these cells look unlike the training data; calls are unreliable"
FALLBACK_RULE = ("no calibrated threshold in the bundle: features beyond 1.25 x the reference's in-sample 99th "
                 "percentile distance, colour beyond the larger of its 95th percentile and the Gaussian 99% point")
_FALLBACK_WARNED: set = set()
#: Colour features measured on the model input (what the model and ``screen`` see) ...
COLOUR_ON_INPUT = "model input"
#: ... or on the original image (references made before the model-input colour).
COLOUR_ON_IMAGE = "image"


class OODWarning(UserWarning):
    """The bundle's out-of-distribution check is weaker than it should be (e.g. no calibrated threshold)."""
#: The OOD reference of a training run is fitted on at most this many validation images (stratified sample):
#: it wants ~10 per feature dimension (32) and costs ~20-45 ms an image on a CPU (decode, colour, forward).
OOD_REFERENCE_MAX_IMAGES = 500


def colour_features(img: np.ndarray) -> np.ndarray:
    """Six numbers describing an image's colour: CIELAB mean of its light pixels (background and red
    cells, the lightest two thirds) and of its darkest 5% (nucleus stain)."""
    step = max(1, min(img.shape[:2]) // 200)
    lab = rgb2lab(img[::step, ::step])
    L = lab[..., 0]
    light = lab[L >= np.percentile(L, 33)].mean(0)
    dark = lab[L <= np.percentile(L, 5)].mean(0)
    return np.r_[light, dark]


def prepare_images(bundle, paths: Sequence[str], um_per_px: Sequence[float], *,
                   stain_target: dict | None = None, colour: bool = False, colour_on: str = COLOUR_ON_INPUT):
    """Load, optionally stain-normalise, and bring images to the model input (:func:`prepare_many`).

    Returns ``(uint8 NHWC, indices of the images that worked, errors)``, plus the
    :func:`colour_features` of each image when ``colour=True``: of the model input
    (``colour_on=COLOUR_ON_INPUT``: white-balanced, scaled and cropped as the model sees it, which
    is also what ``screen`` has of a cell), or of the original image (``COLOUR_ON_IMAGE``, white-balanced
    first for a bundle that white-balances its inputs; references made before the model-input colour).
    A colour cast the bundle removes is no shift for it.
    """
    if colour_on not in (COLOUR_ON_INPUT, COLOUR_ON_IMAGE):
        raise ValueError(f"colour_on must be {COLOUR_ON_INPUT!r} or {COLOUR_ON_IMAGE!r}, got {colour_on!r}")
    cols: dict = {}
    on_image = colour and colour_on == COLOUR_ON_IMAGE

    def before(i: int, img: np.ndarray) -> np.ndarray:
        if on_image:
            cols[i] = colour_features(white_balance(img) if getattr(bundle, "white_balance", False) else img)
        return normalize_stain(img, target=stain_target) if stain_target is not None else img

    batch = prepare_many(bundle, list(paths), list(um_per_px), before=before)
    if not colour:
        return batch.x, batch.ok, batch.errors
    if on_image:
        col = [cols[i] for i in batch.ok]
    else:
        col = [colour_features(x) for x in batch.x]
    return batch.x, batch.ok, batch.errors, np.asarray(col, dtype=np.float64).reshape(len(batch.ok), 6)


def colour_basis(ref: dict | None) -> str:
    """What the colour features of reference ``ref`` were measured on: :data:`COLOUR_ON_INPUT` or
    (references made before it was recorded) :data:`COLOUR_ON_IMAGE`."""
    return ((ref or {}).get("colour") or {}).get("on", COLOUR_ON_IMAGE)


def fit_reference(bundle, table: pd.DataFrame, *, um_per_px=None, estimate_scale: str = "group",
                  dims: int = PCA_DIMS, stain: bool = True, batch_size: int = 64,
                  quantile: float = OOD_QUANTILE) -> dict:
    """The in-distribution reference of a model, from labelled cells it was not trained on.

    ``table`` (path, label[, um_per_px, source]): e.g. the training run's validation
    images, or a held-out split of the training lab. Returns a JSON-ready dict:
    penultimate-feature mean, a PCA basis with its variances, class means in the
    whitened space, the 50/95/99th percentiles of the nearest-class-mean distance,
    the max-probability distribution, the per-cell flag's thresholds at ``quantile``
    (:func:`calibrate_threshold`, out-of-fold on these cells) and the Reinhard stain statistics of
    the images (:func:`leukoscope.imaging.colour.reference_stats`). Store it with :func:`store_reference`.
    """
    table = table[table["label"].isin(bundle.classes)].reset_index(drop=True)
    if len(table) < 10:
        raise ValueError(f"a reference needs at least 10 labelled cells of the model's classes, got {len(table)}")
    if bundle.um_per_px:
        ums = ScalePolicy(given=um_per_px, estimate=estimate_scale).resolve(table, reemit=True)[0]
    else:
        ums = np.full(len(table), np.nan)
    x, ok, _, col = prepare_images(bundle, list(table["path"].astype(str)), ums, colour=True)
    out = forward(bundle, x, batch_size=batch_size, features=True, precision="fp32")
    z, f = out.logits.numpy(), out.features
    labels = table["label"].to_numpy()[ok]
    ref = reference_from_features(f, labels, bundle.classes, col, dims=dims, quantile=quantile)
    p = out.probabilities(bundle.temperature).max(1)
    ref.update({
        "max_prob": {"mean": float(p.mean()), "q05": float(np.quantile(p, 0.05)),
                     "q50": float(np.quantile(p, 0.5))},
        "accuracy": float((np.array(bundle.classes)[z.argmax(1)] == labels).mean()),
    })
    if stain:
        ref["stain"] = reference_stats([table["path"].iloc[i] for i in ok], max_images=200)
    return ref


def reference_from_features(features: np.ndarray, labels: Sequence[str], classes: Sequence[str],
                            colour: np.ndarray, *, dims: int = PCA_DIMS, quantile: float = OOD_QUANTILE) -> dict:
    """The part of a reference that :func:`score_cells` reads, from in-distribution cells' penultimate
    features, labels and :func:`colour_features`: the whitened feature space with its class means and
    distance quantiles, the colour reference, and the per-cell thresholds (:func:`calibrate_threshold`)."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    ref = _fit_feature_space(f, labels, classes, dims)
    d = feature_distances(ref, f)
    ref.update({
        "n": int(len(f)),
        "distance_quantiles": {"q50": float(np.quantile(d, 0.5)), "q95": float(np.quantile(d, 0.95)),
                               "q99": float(np.quantile(d, 0.99))},
        "colour": _fit_colour(np.asarray(colour, dtype=np.float64)),
        "threshold": calibrate_threshold(f, labels, classes, colour, quantile=quantile, dims=dims),
        "method": "Mahalanobis distance to the nearest class mean in a whitened PCA space of the "
                  "penultimate features (the last Linear layer's input)",
    })
    return ref


def _fit_feature_space(f: np.ndarray, labels: np.ndarray, classes: Sequence[str], dims: int = PCA_DIMS) -> dict:
    """Feature mean, a whitened PCA basis (shrunk variances) and the class means in it: the part of a
    reference that :func:`feature_distances` reads."""
    mu = f.mean(0)
    fc = f - mu
    # about ten cells per dimension, so that the reference's own distances are not optimistic
    k = int(max(1, min(dims, fc.shape[0] // 10, fc.shape[1])))
    _, sv, vt = np.linalg.svd(fc, full_matrices=False)
    comps = vt[:k]                                    # (k, D)
    var = (sv[:k] ** 2) / max(1, fc.shape[0] - 1)
    var = var + 0.05 * var.mean() + 1e-8              # shrinkage: small directions are not trusted
    zw = fc @ comps.T / np.sqrt(var)
    class_means = {c: zw[labels == c].mean(0).tolist() for c in classes if (labels == c).any()}
    return {"mean": mu.tolist(), "components": comps.tolist(), "variance": var.tolist(),
            "class_means": class_means, "dims": k}


def _fit_colour(col: np.ndarray) -> dict:
    mu = col.mean(0)
    cov = np.cov(col.T) + np.eye(col.shape[1]) * 1e-2
    ref = {"mean": mu.tolist(), "inv_cov": np.linalg.inv(cov).tolist(), "on": COLOUR_ON_INPUT,
           "features": "CIELAB mean of the light two thirds and of the darkest 5% of pixels"}
    d = colour_distances(ref, col)
    # in-sample distances are optimistic with few cells: never below the Gaussian 95% point
    ref["distance_q95"] = float(max(np.quantile(d, 0.95), np.sqrt(chi2.ppf(0.95, col.shape[1]))))
    return ref


def colour_distances(ref: dict, col: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of colour features (:func:`colour_features`) to the reference colour."""
    c = np.asarray(col) - np.asarray(ref["mean"])
    return np.sqrt(np.einsum("ij,jk,ik->i", c, np.asarray(ref["inv_cov"]), c).clip(0))


def feature_distances(ref: dict, f: np.ndarray) -> np.ndarray:
    """Distance of each feature row to the nearest class mean of ``ref`` (whitened PCA space, per dimension)."""
    comps = np.asarray(ref["components"])
    zw = (f - np.asarray(ref["mean"])) @ comps.T / np.sqrt(np.asarray(ref["variance"]))
    means = np.asarray(list(ref["class_means"].values()))
    d2 = ((zw[:, None, :] - means[None]) ** 2).sum(-1)
    return np.sqrt(d2.min(1) / comps.shape[0])


# --------------------------------------------------------------------------- per-cell score and flag


def calibrate_threshold(features: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                        colour: np.ndarray | None = None, *, quantile: float = OOD_QUANTILE,
                        dims: int = PCA_DIMS, folds: int = OOD_FOLDS, seed: int = 0) -> dict:
    """Per-cell OOD thresholds from in-distribution cells (a training run's validation cells).

    Out-of-fold: the cells are split into ``folds`` stratified parts; each part is scored
    (:func:`feature_distances`, :func:`colour_distances`) against a reference fitted on the
    other parts, so that the distances are those of cells the reference has not seen (in-sample
    ones are optimistic). Each signal's threshold is the ``quantile`` of its out-of-fold
    distances; a cell's score (:func:`score_cells`) is the largest distance / threshold ratio,
    so a cell is flagged when any signal exceeds its threshold. Returns a JSON-ready dict:
    ``quantile``, ``feature`` and ``colour`` thresholds, ``validation_false_alarm_rate`` (the
    out-of-fold fraction of these cells the combined flag fires on), ``n`` and ``method``.
    """
    if not 0.5 <= float(quantile) < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(f)
    if n < 2 * folds:
        raise ValueError(f"calibrating an OOD threshold needs at least {2 * folds} cells, got {n}")
    part = np.empty(n, dtype=int)
    rng = np.random.default_rng(seed)
    offset = 0
    for c in pd.unique(labels):                     # stratified: each class dealt round the folds
        idx = rng.permutation(np.flatnonzero(labels == c))
        part[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    use_colour = colour is not None and len(colour) == n
    df, dc = np.empty(n), np.full(n, np.nan)
    for k in range(folds):
        test, fit = part == k, part != k
        df[test] = feature_distances(_fit_feature_space(f[fit], labels[fit], classes, dims), f[test])
        if use_colour:
            dc[test] = colour_distances(_fit_colour(np.asarray(colour)[fit]), np.asarray(colour)[test])
    thr = {"quantile": float(quantile), "feature": float(np.quantile(df, quantile)), "colour": None,
           "n": int(n), "folds": int(folds),
           "method": f"out-of-fold ({folds} folds) {quantile:.3g} quantile of each signal's distance on the "
                     "validation cells; a cell is flagged when any signal exceeds its threshold"}
    if use_colour:
        thr["colour"] = float(np.quantile(dc, quantile))
    score = _ratio(df, thr["feature"])
    if use_colour:
        score = np.maximum(score, _ratio(dc, thr["colour"]))
    thr["validation_false_alarm_rate"] = float((score > 1.0).mean())
    return thr


def _ratio(d: np.ndarray, t: float) -> np.ndarray:
    return np.asarray(d, dtype=np.float64) / max(float(t), 1e-12)


def fallback_threshold(ref: dict) -> dict:
    """Thresholds for a reference stored without calibrated ones (bundles made before them).

    The rule (:data:`FALLBACK_RULE`): features, 1.25 x the reference's own (in-sample, hence
    optimistic) 99th-percentile distance; colour, its stored 95th-percentile distance or the
    Gaussian 99% point of a 6-d Mahalanobis distance, whichever is larger."""
    thr = {"quantile": 0.99, "feature": 1.25 * float(ref["distance_quantiles"]["q99"]), "colour": None,
           "validation_false_alarm_rate": None, "method": FALLBACK_RULE, "fallback": True}
    if "colour" in ref:
        thr["colour"] = float(max(ref["colour"]["distance_q95"], np.sqrt(chi2.ppf(0.99, 6))))
    return thr


def reference_threshold(ref: dict, name: str = "the bundle") -> dict:
    """The stored per-cell thresholds of ``ref`` (:func:`calibrate_threshold`), else
    :func:`fallback_threshold` with a warning, once per ``name``."""
    thr = ref.get("threshold")
    if thr:
        return thr
    if name not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(name)
        warnings.warn(f"{name} stores no calibrated out-of-distribution threshold (made before they were): "
                      f"cells are flagged by the fallback rule ({FALLBACK_RULE})", OODWarning, stacklevel=3)
    return fallback_threshold(ref)


@dataclass
class CellScores:
    """Per-cell OOD scores of a group of cells: ``score`` is the largest distance / threshold ratio
    over the signals (1.0 = at the threshold), ``flag`` is ``score > 1``."""

    score: np.ndarray
    flag: np.ndarray
    threshold: dict

    def summary(self) -> dict:
        """:func:`ood_summary` of these cells."""
        return ood_summary(self.flag, self.score, self.threshold)


def score_cells(bundle, features: np.ndarray, colour: np.ndarray | None = None) -> CellScores | None:
    """Per-cell OOD score and flag of cells against ``bundle``'s reference (``None`` without one).

    ``features``: penultimate features of the plain view
    (``models.inference.forward(..., features=True).features``); ``colour``: their images'
    :func:`colour_features` (optional: without it only the features count). Thresholds are the
    bundle's calibrated ones (:func:`calibrate_threshold`), else :func:`fallback_threshold`.
    """
    ref = (getattr(bundle, "meta", None) or {}).get(REFERENCE_KEY)
    if not ref:
        return None
    thr = reference_threshold(ref, str(getattr(bundle, "path", None) or "the bundle"))
    f = np.asarray(features, dtype=np.float64)
    if len(f) == 0:
        return CellScores(np.zeros(0), np.zeros(0, dtype=bool), thr)
    score = _ratio(feature_distances(ref, f), thr["feature"])
    if colour is not None and len(colour) == len(f) and thr.get("colour") and "colour" in ref:
        score = np.maximum(score, _ratio(colour_distances(ref["colour"], colour), thr["colour"]))
    return CellScores(score, score > 1.0, thr)


def shift_warning(flagged: int, total: int) -> str:
    """The run-level warning line: ``"N of M cells look unlike the training data; calls are unreliable"``."""
    return f"{flagged} of {total} cells look unlike the training data; calls are unreliable"


def ood_summary(flag: Sequence[bool], score: Sequence[float], threshold: dict | None) -> dict:
    """``{flagged, total, fraction, median_score, threshold, warning}`` of a group of cells.

    ``warning`` (:func:`shift_warning`) when more than :data:`OOD_WARN_FRACTION` of the cells are
    flagged or their median score is above the threshold (1.0), else ``None``."""
    flag = np.asarray(flag, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n, k = int(len(flag)), int(flag.sum())
    frac = k / n if n else None
    med = float(np.median(score)) if n else None
    shifted = bool(n) and (frac > OOD_WARN_FRACTION or med > 1.0)
    thr = None
    if threshold is not None:
        thr = {key: threshold.get(key) for key in ("quantile", "feature", "colour", "validation_false_alarm_rate")}
        thr["fallback"] = bool(threshold.get("fallback", False))
    return {"flagged": k, "total": n, "fraction": None if frac is None else round(frac, 6),
            "median_score": None if med is None else round(med, 6), "threshold": thr,
            "warning": shift_warning(k, n) if shifted else None}


def store_reference(bundle_path: str | os.PathLike, ref: dict) -> Path:
    """Write ``ref`` into the bundle's metadata (``meta["reference"]``) with the bundle API."""
    b = load_bundle(bundle_path)
    meta = dict(b.meta)
    meta[REFERENCE_KEY] = ref
    return save_bundle(b.model, meta, b.path)


def ood_check(ref: dict | None, features: np.ndarray, max_prob: np.ndarray, name: str,
              colour: np.ndarray | None = None) -> dict:
    """OOD statistics of one group of cells against the reference, with a warning line when shifted.

    Three signals: penultimate features beyond the reference's 95th-percentile distance,
    image colour (light and dark pixels in CIELAB) beyond the reference's 95th percentile,
    and the drop of mean max-probability. A model can map a shifted image confidently
    into its training features (measured: Raabin cells under a PBC model), which is why
    the model-independent colour signal is checked as well.
    """
    out: dict = {"n": int(len(max_prob)), "mean_max_prob": float(np.mean(max_prob)) if len(max_prob) else float("nan")}
    if ref is None:
        out["warning"] = None
        out["note"] = "the bundle stores no in-distribution reference; run evaluate with --fit-reference DATA"
        return out
    if len(max_prob) == 0:
        out["warning"] = None
        return out
    d = feature_distances(ref, features)
    q95 = ref["distance_quantiles"]["q95"]
    frac = float((d > q95).mean())
    drop = float(ref["max_prob"]["mean"] - np.mean(max_prob))
    out.update({"median_distance": float(np.median(d)), "reference_median_distance": ref["distance_quantiles"]["q50"],
                "fraction_beyond_reference_q95": frac, "expected_fraction": 0.05,
                "reference_mean_max_prob": ref["max_prob"]["mean"], "confidence_drop": drop})
    cfrac = float("nan")
    if colour is not None and "colour" in ref and len(colour):
        cfrac = float((colour_distances(ref["colour"], colour) > ref["colour"]["distance_q95"]).mean())
        out["colour_fraction_beyond_reference_q95"] = cfrac
    reasons = []
    if frac >= OOD_FRACTION:
        reasons.append(f"{frac:.0%} of its {len(d)} cells lie farther from the training features than 95% of "
                       "in-distribution cells")
    if cfrac >= OOD_FRACTION:
        reasons.append(f"{cfrac:.0%} have a colour (background, red cells, nuclei) farther from the training "
                       "images' than 95% of them")
    if drop >= OOD_CONFIDENCE_DROP:
        reasons.append(f"mean confidence {np.mean(max_prob):.2f} vs {ref['max_prob']['mean']:.2f} on reference cells")
    out["out_of_distribution"] = bool(reasons)
    out["warning"] = None
    if reasons:
        out["warning"] = (f"WARNING: {name!r} looks out of distribution for this model: " + "; ".join(reasons)
                          + " (expected 5%). Predictions may be unreliable: check the scale (--um-per-px) and "
                          "the stain (--stain-normalize), or validate on labelled cells of this source.")
    return out


def reference_sample(table: pd.DataFrame, max_images: int, seed: int = 0) -> pd.DataFrame:
    """``table`` itself, or a class-stratified random sample of about ``max_images`` of its rows (in table order)."""
    if len(table) <= max_images:
        return table
    return table.groupby("label", group_keys=False).sample(frac=max_images / len(table), random_state=seed).sort_index()


def fit_training_reference(model, meta: dict, bundle_path: Path, val_table: pd.DataFrame, device,
                           log: Callable[[str], None], seed: int = 0) -> dict | None:
    """The OOD reference of a just-trained model on its validation images, or ``None`` with a warning.

    At most :data:`OOD_REFERENCE_MAX_IMAGES` images (a stratified sample), brought to the
    model as in training (the table's µm/px, nothing re-estimated). Any failure (e.g.
    fewer than 10 validation images) is reported and the run goes on: the bundle is
    already written.
    """
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
    thr = ref["threshold"]
    log(f"out-of-distribution reference: {ref['n']} validation images, {ref['dims']} feature dimensions; "
        f"per-cell threshold at their {thr['quantile']:.3g} quantile (out-of-fold), flagging "
        f"{thr['validation_false_alarm_rate']:.1%} of them ({time.time() - t0:.1f}s)")
    return ref
