"""The out-of-distribution reference of a model, and the check of other cells against it.

:func:`fit_reference` measures, on labelled in-distribution cells the model was not trained on
(a training run's validation images: :func:`fit_training_reference`), the penultimate-layer
features (Mahalanobis distance to the nearest class mean in a whitened PCA space, Lee et al.
2018), the image colour (CIELAB of light pixels and of nuclei) and the max-probability
distribution; the bundle stores it under ``meta["reference"]`` (:data:`REFERENCE_KEY`).
:func:`ood_check` compares a group of cells with it (used by ``leukoscope evaluate``, per source).
"""

from __future__ import annotations

import os
import time
import warnings
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
                   stain_target: dict | None = None, colour: bool = False):
    """Load, optionally stain-normalise, and bring images to the model input (:func:`prepare_many`).

    Returns ``(uint8 NHWC, indices of the images that worked, errors)``, plus the
    :func:`colour_features` of each original image when ``colour=True`` (white-balanced first for
    a bundle that white-balances its inputs: a colour cast it removes is no shift for it).
    """
    cols: dict = {}

    def before(i: int, img: np.ndarray) -> np.ndarray:
        if colour:
            cols[i] = colour_features(white_balance(img) if getattr(bundle, "white_balance", False) else img)
        return normalize_stain(img, target=stain_target) if stain_target is not None else img

    batch = prepare_many(bundle, list(paths), list(um_per_px), before=before)
    if colour:
        return batch.x, batch.ok, batch.errors, np.asarray([cols[i] for i in batch.ok]).reshape(len(batch.ok), 6)
    return batch.x, batch.ok, batch.errors


def fit_reference(bundle, table: pd.DataFrame, *, um_per_px=None, estimate_scale: str = "group",
                  dims: int = PCA_DIMS, stain: bool = True, batch_size: int = 64) -> dict:
    """The in-distribution reference of a model, from labelled cells it was not trained on.

    ``table`` (path, label[, um_per_px, source]): e.g. the training run's validation
    images, or a held-out split of the training lab. Returns a JSON-ready dict:
    penultimate-feature mean, a PCA basis with its variances, class means in the
    whitened space, the 50/95/99th percentiles of the nearest-class-mean distance,
    the max-probability distribution, and the Reinhard stain statistics of the images
    (:func:`leukoscope.imaging.colour.reference_stats`). Store it with :func:`store_reference`.
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
    mu = f.mean(0)
    fc = f - mu
    # about ten cells per dimension, so that the reference's own distances are not optimistic
    k = int(max(1, min(dims, fc.shape[0] // 10, fc.shape[1])))
    _, sv, vt = np.linalg.svd(fc, full_matrices=False)
    comps = vt[:k]                                    # (k, D)
    var = (sv[:k] ** 2) / max(1, fc.shape[0] - 1)
    var = var + 0.05 * var.mean() + 1e-8              # shrinkage: small directions are not trusted
    zw = fc @ comps.T / np.sqrt(var)
    class_means = {c: zw[labels == c].mean(0).tolist() for c in bundle.classes if (labels == c).any()}
    ref = {"mean": mu.tolist(), "components": comps.tolist(), "variance": var.tolist(),
           "class_means": class_means}
    d = feature_distances(ref, f)
    p = out.probabilities(bundle.temperature).max(1)
    ref.update({
        "n": int(len(f)), "dims": k,
        "distance_quantiles": {"q50": float(np.quantile(d, 0.5)), "q95": float(np.quantile(d, 0.95)),
                               "q99": float(np.quantile(d, 0.99))},
        "max_prob": {"mean": float(p.mean()), "q05": float(np.quantile(p, 0.05)),
                     "q50": float(np.quantile(p, 0.5))},
        "accuracy": float((np.array(bundle.classes)[z.argmax(1)] == labels).mean()),
        "colour": _fit_colour(col),
        "method": "Mahalanobis distance to the nearest class mean in a whitened PCA space of the "
                  "penultimate features (the last Linear layer's input)",
    })
    if stain:
        ref["stain"] = reference_stats([table["path"].iloc[i] for i in ok], max_images=200)
    return ref


def _fit_colour(col: np.ndarray) -> dict:
    mu = col.mean(0)
    cov = np.cov(col.T) + np.eye(col.shape[1]) * 1e-2
    ref = {"mean": mu.tolist(), "inv_cov": np.linalg.inv(cov).tolist(),
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
    log(f"out-of-distribution reference: {ref['n']} validation images, {ref['dims']} feature dimensions "
        f"({time.time() - t0:.1f}s)")
    return ref
