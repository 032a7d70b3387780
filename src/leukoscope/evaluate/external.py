"""Scoring a trained bundle on other labs' cells: per source, per class, with an out-of-distribution check.

The question of issue 7: does a model trained on one lab's cells work on another lab's?
:func:`evaluate_sets` answers it for any labelled set (any reader layout):

1. **rows**: every labelled image; cells of classes the model does not know are counted
   per source and left out of the metrics (a PBC model cannot be right about a blast);
2. **scale**: each image is brought to the model's µm/px — the user's ``um_per_px``,
   else the table's, else estimated per source from the red cells
   (:func:`leukoscope.imaging.scale_estimate.resolve_um_per_px`); a model without a physical
   scale resizes, as at training;
3. **colour** (optional): Reinhard stain normalisation onto the reference the bundle
   stores (:func:`leukoscope.imaging.colour.normalize_stain`);
4. **metrics** per source with the report's own functions
   (:mod:`leukoscope.evaluate.metrics`: accuracy, balanced accuracy, macro-F1 with
   bootstrap intervals; per-class sensitivity, precision, F1);
5. **out-of-distribution warning** per source, against a reference stored in the
   bundle (:func:`fit_reference`, computed on in-distribution cells the model was not
   trained on): the penultimate-layer features (Mahalanobis distance to the nearest
   class mean in a whitened PCA space, Lee et al. 2018), the image colour (CIELAB of
   light pixels and of nuclei, Mahalanobis distance), and the drop in mean
   max-probability. A source whose cells lie beyond the reference's 95th-percentile
   distance far more often than 5% of the time, or whose confidence drops clearly,
   gets a warning line.

>>> from leukoscope.models.bundle import load_bundle
>>> from leukoscope.data import read_dataset
>>> b = load_bundle("runs/pbc/model.safetensors")                              # doctest: +SKIP
>>> res = evaluate_sets(b, [read_dataset("../shared/data/aml_lmu_sample").table])  # doctest: +SKIP
>>> res.per_source["lmu"]["accuracy"]["value"], res.warnings                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from leukoscope import taxonomy

REFERENCE_KEY = "reference"
#: A source is flagged when this fraction of its cells lie beyond the reference's 95th percentile.
OOD_FRACTION = 0.25
#: ... or when its mean max-probability is this much lower than the reference's.
OOD_CONFIDENCE_DROP = 0.15
PCA_DIMS = 32


@dataclass
class EvaluationResult:
    predictions: pd.DataFrame            # path,label,fold,pred,prob_<C>...,source,known,max_prob,ood_score,...
    per_source: dict                     # source -> metrics (report's overall_metrics) + counts
    per_class: pd.DataFrame              # source,class,n_true,n_pred,sensitivity,precision,f1
    ood: dict                            # source -> OOD statistics and "warning" (or None)
    scale: dict                          # how µm/px was decided, per source
    warnings: list = field(default_factory=list)
    errors: list = field(default_factory=list)     # unreadable images: {"path", "reason"}
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"settings": self.settings, "per_source": self.per_source, "ood": self.ood, "scale": self.scale,
                "warnings": list(self.warnings), "errors": list(self.errors)}


# --------------------------------------------------------------------------- rows


def group_labels(table: pd.DataFrame, group_by: str = "source") -> pd.Series:
    """The group of each row: its ``source`` column, or the parent folder name of its image (``folder``)."""
    if group_by == "source":
        if "source" not in table:
            return pd.Series(["all"] * len(table), index=table.index)
        return table["source"].fillna("unknown").astype(str)
    if group_by == "folder":
        return table["path"].map(lambda p: Path(str(p)).parent.name)
    raise ValueError(f"group_by must be 'source' or 'folder', got {group_by!r}")


def combine_tables(tables: Sequence[pd.DataFrame], group_by: str = "source") -> pd.DataFrame:
    """One table of several datasets with a ``group`` column; an image listed twice is kept once."""
    parts = []
    for t in tables:
        t = t.copy()
        t["group"] = group_labels(t, group_by).to_numpy()
        parts.append(t)
    if not parts:
        raise ValueError("no datasets to evaluate")
    df = pd.concat(parts, ignore_index=True)
    if "um_per_px" not in df:
        df["um_per_px"] = np.nan
    return df.drop_duplicates("path", keep="first").reset_index(drop=True)


# --------------------------------------------------------------------------- features


def _last_linear(model):
    from torch import nn

    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the model has no Linear layer: cannot take penultimate features")
    return last


def logits_and_features(bundle, x_uint8, batch_size: int = 64):
    """Logits and penultimate features (the last Linear layer's input) of prepared uint8 NHWC images."""
    import torch

    from leukoscope.models.preprocess import normalize

    model = bundle.model.eval()
    feats: list = []
    hook = _last_linear(model).register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach().float().cpu()))
    outs = []
    try:
        with torch.inference_mode():
            for i in range(0, len(x_uint8), batch_size):
                xb = normalize(torch.as_tensor(x_uint8[i:i + batch_size]), bundle.mean, bundle.std).to(bundle.device)
                xb = xb.contiguous(memory_format=torch.channels_last)
                outs.append(model(xb).float().cpu())
    finally:
        hook.remove()
    if not outs:
        return np.zeros((0, len(bundle.classes))), np.zeros((0, 0))
    return torch.cat(outs).numpy(), torch.cat(feats).flatten(1).numpy()


def _softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / t
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------- preparing images


def colour_features(img: np.ndarray) -> np.ndarray:
    """Six numbers describing an image's colour: CIELAB mean of its light pixels (background and red
    cells, the lightest two thirds) and of its darkest 5% (nucleus stain)."""
    from skimage.color import rgb2lab

    step = max(1, min(img.shape[:2]) // 200)
    lab = rgb2lab(img[::step, ::step])
    L = lab[..., 0]
    light = lab[L >= np.percentile(L, 33)].mean(0)
    dark = lab[L <= np.percentile(L, 5)].mean(0)
    return np.r_[light, dark]


def prepare_images(bundle, paths: Sequence[str], um_per_px: Sequence[float], *,
                   stain_target: dict | None = None, colour: bool = False):
    """Load, optionally stain-normalise, and bring images to the model input.

    Returns ``(uint8 NHWC, indices of the images that worked, errors)``, plus the
    :func:`colour_features` of each original image when ``colour=True`` (white-balanced first for
    a bundle that white-balances its inputs: a colour cast it removes is no shift for it).
    """
    from leukoscope.imaging.images import ImageError, load_rgb
    from leukoscope.imaging.colour import normalize_stain, white_balance

    s = bundle.input_size
    out = np.empty((len(paths), s, s, 3), dtype=np.uint8)
    ok, errors, cols = [], [], []
    for i, (p, um) in enumerate(zip(paths, um_per_px)):
        try:
            img = load_rgb(p)
            if colour:
                cols.append(colour_features(white_balance(img) if getattr(bundle, "white_balance", False) else img))
            if stain_target is not None:
                img = normalize_stain(img, target=stain_target)
            um = None if um is None or not math.isfinite(float(um)) else float(um)
            out[len(ok)] = bundle.prepare([img], um)[0]
            ok.append(i)
        except (ImageError, ValueError, OSError) as exc:
            if colour and len(cols) > len(ok):
                cols.pop()
            errors.append({"path": str(p), "reason": getattr(exc, "reason", str(exc))})
    if colour:
        return out[:len(ok)], ok, errors, np.asarray(cols).reshape(len(ok), 6)
    return out[:len(ok)], ok, errors


# --------------------------------------------------------------------------- OOD reference


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
    from leukoscope.imaging.scale_estimate import resolve_um_per_px
    from leukoscope.imaging.colour import reference_stats

    table = table[table["label"].isin(bundle.classes)].reset_index(drop=True)
    if len(table) < 10:
        raise ValueError(f"a reference needs at least 10 labelled cells of the model's classes, got {len(table)}")
    if bundle.um_per_px:
        ums = resolve_um_per_px(table, user_um_per_px=um_per_px, estimate=estimate_scale).um_per_px
    else:
        ums = np.full(len(table), np.nan)
    x, ok, _, col = prepare_images(bundle, list(table["path"].astype(str)), ums, colour=True)
    z, f = logits_and_features(bundle, x, batch_size)
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
    d = _distances(ref, f)
    p = _softmax(z, bundle.temperature).max(1)
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
    from scipy.stats import chi2

    d = _colour_distances(ref, col)
    # in-sample distances are optimistic with few cells: never below the Gaussian 95% point
    ref["distance_q95"] = float(max(np.quantile(d, 0.95), np.sqrt(chi2.ppf(0.95, col.shape[1]))))
    return ref


def _colour_distances(ref: dict, col: np.ndarray) -> np.ndarray:
    c = np.asarray(col) - np.asarray(ref["mean"])
    return np.sqrt(np.einsum("ij,jk,ik->i", c, np.asarray(ref["inv_cov"]), c).clip(0))


def _distances(ref: dict, f: np.ndarray) -> np.ndarray:
    comps = np.asarray(ref["components"])
    zw = (f - np.asarray(ref["mean"])) @ comps.T / np.sqrt(np.asarray(ref["variance"]))
    means = np.asarray(list(ref["class_means"].values()))
    d2 = ((zw[:, None, :] - means[None]) ** 2).sum(-1)
    return np.sqrt(d2.min(1) / comps.shape[0])


def store_reference(bundle_path: str | os.PathLike, ref: dict) -> Path:
    """Write ``ref`` into the bundle's metadata (``meta["reference"]``) with the bundle API."""
    from leukoscope.models.bundle import load_bundle, save_bundle

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
    d = _distances(ref, features)
    q95 = ref["distance_quantiles"]["q95"]
    frac = float((d > q95).mean())
    drop = float(ref["max_prob"]["mean"] - np.mean(max_prob))
    out.update({"median_distance": float(np.median(d)), "reference_median_distance": ref["distance_quantiles"]["q50"],
                "fraction_beyond_reference_q95": frac, "expected_fraction": 0.05,
                "reference_mean_max_prob": ref["max_prob"]["mean"], "confidence_drop": drop})
    cfrac = float("nan")
    if colour is not None and "colour" in ref and len(colour):
        cfrac = float((_colour_distances(ref["colour"], colour) > ref["colour"]["distance_q95"]).mean())
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


# --------------------------------------------------------------------------- evaluation


def evaluate_sets(bundle, tables: Sequence[pd.DataFrame] | pd.DataFrame, *, group_by: str = "source",
                  um_per_px: float | None = None, estimate_scale: str = "group", stain_normalize: bool = False,
                  stain_target: dict | None = None, n_boot: int = 1000, seed: int = 0,
                  batch_size: int = 64, tta: bool = False) -> EvaluationResult:
    """Score ``bundle`` on labelled tables, per group (``source`` column or image ``folder``) and per class.

    ``tta``: probabilities averaged over the 8 rotations by 90° and mirror images of each cell
    (the OOD check keeps the plain view's features and confidence, as its reference was fitted)."""
    from leukoscope.evaluate.metrics import overall_metrics, per_class_fold_metrics
    from leukoscope.predict import predictions_table
    from leukoscope.imaging.scale_estimate import resolve_um_per_px

    if isinstance(tables, pd.DataFrame):
        tables = [tables]
    df = combine_tables(tables, group_by)
    classes = list(bundle.classes)
    ref = bundle.meta.get(REFERENCE_KEY)
    res_warn: list[str] = []

    # scale
    scale_info: dict = {}
    if bundle.um_per_px:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rs = resolve_um_per_px(df, user_um_per_px=um_per_px, estimate=estimate_scale, group_col="group")
        res_warn += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        df["um_per_px"], df["scale_origin"] = rs.um_per_px, rs.origin
        for g, sub in df.groupby("group", sort=True):
            scale_info[str(g)] = {"um_per_px_median": float(np.nanmedian(sub["um_per_px"])) if sub["um_per_px"].notna().any() else None,
                                  "origin": sorted(set(sub["scale_origin"])), "estimate": rs.estimates.get(str(g))}
    else:
        df["um_per_px"], df["scale_origin"] = np.nan, "model has no physical scale: resized"
        scale_info = {"note": "the model records no µm/px; every image is resized to the input, as in training"}

    # colour
    target = None
    if stain_normalize:
        target = stain_target or (ref or {}).get("stain")
        if not target:
            raise ValueError("--stain-normalize needs a reference: the bundle stores none; give --fit-reference DATA "
                             "(in-distribution cells) or a target")

    known = df["label"].isin(classes).to_numpy()
    x, ok, errors, col = prepare_images(bundle, list(df["path"].astype(str)), df["um_per_px"].tolist(),
                                        stain_target=target, colour=True)
    z, f = logits_and_features(bundle, x, batch_size)
    probs = plain = _softmax(z, bundle.temperature)
    if tta and len(x):
        from leukoscope.models.preprocess import dihedral_views

        views = dihedral_views(x)[1:]
        probs = (plain + sum(_softmax(logits_and_features(bundle, v, batch_size)[0], bundle.temperature)
                             for v in views)) / (1 + len(views))
    rows = df.iloc[ok].reset_index(drop=True)
    pred = predictions_table(rows["path"].tolist(), probs, classes)
    pred.insert(1, "label", rows["label"].to_numpy())
    pred.insert(2, "fold", 0)
    pred["source"] = rows["group"].to_numpy()
    pred["known"] = rows["label"].isin(classes).to_numpy()
    pred["max_prob"] = probs.max(1) if len(probs) else np.zeros(0)
    pred["ood_score"] = _distances(ref, f) if (ref is not None and len(f)) else np.nan
    pred["um_per_px"] = rows["um_per_px"].to_numpy()
    pred["scale_origin"] = rows["scale_origin"].to_numpy()

    per_source, per_class_rows, ood = {}, [], {}
    groups = list(pd.unique(df["group"]))
    for g in groups + ["ALL"]:
        sub_all = pred if g == "ALL" else pred[pred["source"] == g]
        sub = sub_all[sub_all["known"]]
        n_unknown = df.loc[(~known) & ((df["group"] == g) if g != "ALL" else True), "label"].value_counts()
        entry: dict = {"n_images": int(len(sub_all)), "n_scored": int(len(sub)),
                       "n_unknown_class": int(n_unknown.sum()),
                       "unknown_classes": {str(k): int(v) for k, v in n_unknown.items()},
                       "classes_scored": [c for c in classes if c in set(sub["label"])]}
        if len(sub):
            m = overall_metrics(sub, classes=classes, n_boot=n_boot, seed=seed)
            entry.update({k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
            entry["predicted_classes"] = {str(k): int(v) for k, v in sub["pred"].value_counts().items()}
            fm = per_class_fold_metrics(sub, classes)
            for r in fm.itertuples(index=False):
                if r.n_true == 0 and r.n_pred == 0:
                    continue
                per_class_rows.append({"source": g, "class": r._1, "n_true": r.n_true, "n_pred": r.n_pred,
                                       "sensitivity": r.sensitivity, "precision": r.precision, "f1": r.f1})
        per_source[str(g)] = entry
        if g != "ALL":
            mask = (pred["source"] == g).to_numpy()
            ood[str(g)] = ood_check(ref, f[mask] if len(f) else f, plain.max(1)[mask], str(g),
                                    colour=col[mask])
            if ood[str(g)].get("warning"):
                res_warn.append(ood[str(g)]["warning"])
    if ref is None:
        res_warn.append("no out-of-distribution check: the bundle stores no in-distribution reference "
                        "(run evaluate once with --fit-reference DATA, cells of the training lab not trained on)")
    per_class = pd.DataFrame(per_class_rows, columns=["source", "class", "n_true", "n_pred", "sensitivity",
                                                      "precision", "f1"])
    settings = {"model": bundle.path, "classes": classes, "group_by": group_by, "um_per_px": um_per_px,
                "estimate_scale": estimate_scale, "model_um_per_px": bundle.um_per_px,
                "stain_normalize": bool(stain_normalize), "n_boot": n_boot, "seed": seed}
    return EvaluationResult(pred, per_source, per_class, ood, scale_info, res_warn, errors, settings)


def write_outputs(result: EvaluationResult, out: str | os.PathLike) -> dict[str, Path]:
    """``evaluate.json``, ``per_class.csv`` and ``predictions.csv`` in folder ``out`` (atomic writes)."""
    from leukoscope.io import atomic_write_csv, atomic_write_json

    out = Path(out)
    return {
        "evaluate.json": atomic_write_json(result.summary(), out / "evaluate.json"),
        "per_class.csv": atomic_write_csv(result.per_class, out / "per_class.csv"),
        "predictions.csv": atomic_write_csv(result.predictions, out / "predictions.csv"),
    }


def validation_table(bundle, train_table: pd.DataFrame) -> pd.DataFrame:
    """The validation images of a ``leukoscope train`` run, reproduced from its training table.

    The trainer holds out ``val_fraction`` per class with ``seed`` (stratified); given the
    same table this returns the same images, i.e. in-distribution cells the weights were
    not fitted on: the right data for :func:`fit_reference`.
    """
    from leukoscope.train.loop import stratified_val_split

    cfg = bundle.meta.get("config") or {}
    t = train_table[train_table["label"].isin(bundle.classes)].reset_index(drop=True)
    cidx = {c: i for i, c in enumerate(bundle.classes)}
    y = np.array([cidx[c] for c in t["label"]])
    _, va = stratified_val_split(y, float(cfg.get("val_fraction", 0.1)), int(cfg.get("seed", 0)))
    return t.iloc[va].reset_index(drop=True)
