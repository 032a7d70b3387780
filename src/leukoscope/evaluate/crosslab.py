"""Cross-lab measurement: several labs' cells, frozen pretrained features, linear probes.

The library part of ``benchmarks/crosslab.py``, kept here because the protocols are what
any cross-lab comparison needs (phase 2 scores fine-tuned models on the same labs, splits
and K-shot draws):

* labs: :class:`LabSpec` (``name=PATH[:prefix]``), :func:`read_labs` -> one table with a
  ``source`` column = lab name; :func:`qualifying_labs` (>= 20 cells in >= 3 classes);
* features: :func:`prepare_images` (white balance, physical scale or resize) and
  :func:`extract_features` (penultimate features of a pretrained backbone, optionally the
  mean over the 8 dihedral views), cached by :func:`cached_features`;
* protocols on a feature matrix: :func:`leave_one_lab_out` (zero-shot on each lab, its
  classes that the training labs know), :func:`adaptation_curve` (training labs + K
  labelled cells per class of the lab, scored on the lab's other cells),
  :func:`in_domain` (a stratified held-out share of one lab); :func:`selection_score`
  is the rule declared in ``docs/crosslab.md``.

>>> parse_lab("jhu=../shared/data/external_wbc:images/jhu_apl_aml")
LabSpec(name='jhu', path='../shared/data/external_wbc', prefix='images/jhu_apl_aml')
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

from leukoscope.data.readers import read_dataset
from leukoscope.imaging.images import load_rgb
from leukoscope.imaging.scale_policy import ScalePolicy
from leukoscope.io import atomic_path
from leukoscope.models.pipeline import dihedral_views, normalize, prepare_image
from leukoscope.models.registry import create_model, get_config

#: The adaptation curve's K (labelled cells per class of the new lab).
KS = (0, 1, 3, 5, 10, 20)


# --------------------------------------------------------------------------- labs


@dataclass(frozen=True)
class LabSpec:
    """One lab: a dataset ``read_dataset`` reads, optionally only the rows whose path (relative
    to the dataset folder) starts with ``prefix`` (one lab's share of a pooled set)."""

    name: str
    path: str
    prefix: str | None = None


def parse_lab(text: str) -> LabSpec:
    """``name=PATH`` or ``name=PATH:prefix`` -> :class:`LabSpec`."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f"lab {text!r}: expected name=PATH or name=PATH:prefix")
    path, _, prefix = rest.partition(":")
    return LabSpec(name.strip(), path, prefix or None)


def default_labs(shared: str | os.PathLike) -> list[LabSpec]:
    """The five labs of ``../shared/data``; external_wbc's pbc_barcelona cells are left out
    (they are PBC's lab, 14 of them byte-copies of pbc/ files)."""
    s = Path(shared)
    return [LabSpec("pbc", str(s / "pbc")), LabSpec("lmu", str(s / "aml_lmu_sample")),
            LabSpec("jhu", str(s / "external_wbc"), "images/jhu_apl_aml"),
            LabSpec("raabin", str(s / "external_wbc"), "images/raabin_wbc"),
            LabSpec("jiangxi", str(s / "jiangxi_tecom"))]


def read_labs(specs: Sequence[LabSpec]) -> pd.DataFrame:
    """One table ``path, label, source, um_per_px`` over all labs (``source`` = lab name)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"lab names must be unique, got {names}")
    parts = []
    for spec in specs:
        t = read_dataset(spec.path).table
        if spec.prefix:
            root = Path(spec.path).resolve()
            rel = t["path"].map(lambda p: Path(p).resolve().relative_to(root).as_posix()
                                if Path(p).resolve().is_relative_to(root) else str(p))
            t = t[rel.str.startswith(spec.prefix.rstrip("/") + "/")]
        if t.empty:
            raise ValueError(f"lab {spec.name!r}: no labelled cells in {spec.path}"
                             + (f" under {spec.prefix!r}" if spec.prefix else ""))
        t = t.assign(source=spec.name)
        cols = ["path", "label", "source"] + (["um_per_px"] if "um_per_px" in t else [])
        parts.append(t[cols])
    out = pd.concat(parts, ignore_index=True)
    if "um_per_px" not in out:
        out["um_per_px"] = np.nan
    return out


def qualifying_labs(table: pd.DataFrame, min_cells: int = 20, min_classes: int = 3) -> list[str]:
    """Labs that have ``>= min_cells`` cells in ``>= min_classes`` classes (the adaptation target's labs)."""
    counts = table.groupby(["source", "label"]).size()
    return [lab for lab, c in counts.groupby(level=0) if int((c >= min_cells).sum()) >= min_classes]


# --------------------------------------------------------------------------- features


def prepare_images(table: pd.DataFrame, input_size: int, *, scale: str = "resize",
                   model_um_per_px: float | None = None, white_balance: bool = True) -> tuple[np.ndarray, dict]:
    """All cells of ``table`` as uint8 ``(N, S, S, 3)`` model inputs, and what was done.

    ``scale="physical"``: each cell is resampled from its µm/px (the table's, else estimated
    from red cells per ``source`` by the scale policy, :class:`~leukoscope.imaging.scale_policy.ScalePolicy`) to ``model_um_per_px``, then
    centre-cropped / padded; a source whose estimate is not usable is resized (and said so).
    ``scale="resize"``: every cell resized to ``S x S``.
    """
    if scale not in ("resize", "physical"):
        raise ValueError(f"scale must be 'resize' or 'physical', got {scale!r}")
    info: dict = {"scale": scale, "white_balance": white_balance}
    um = np.full(len(table), np.nan)
    if scale == "physical":
        if model_um_per_px is None:
            raise ValueError("scale='physical' needs model_um_per_px")
        um, _, rec = ScalePolicy(estimate="group", group_col="source").resolve(table)
        info.update(estimates={k: v.get("um_per_px") for k, v in rec.estimates.items()}, warnings=rec.warnings)
    out = np.empty((len(table), input_size, input_size, 3), np.uint8)
    for i, path in enumerate(table["path"].astype(str)):
        out[i] = prepare_image(load_rgb(path), input_size, model_um_per_px if np.isfinite(um[i]) else None,
                               um[i] if np.isfinite(um[i]) else None, white_balance=white_balance)
    return out, info


def _feature_net(name: str, input_size: int):
    """Pretrained model ``name`` with its classifier removed: images -> penultimate features."""
    import torch  # torch imported here like the rest of the package's model code

    model = create_model(name, num_classes=1000, input_size=input_size, pretrained=True)
    if hasattr(model, "reset_classifier"):   # timm
        model.reset_classifier(0)
    else:                                    # torchvision: classifier = Dropout + Linear
        model.classifier = torch.nn.Identity()
    return model.eval()


def extract_features(name: str, images: np.ndarray, *, dihedral: bool = False, batch_size: int = 64,
                     progress=None) -> np.ndarray:
    """Penultimate features ``(N, D)`` float32 of pretrained ``name`` on prepared uint8 images;
    ``dihedral``: the mean over the 8 rotations / mirror images of each cell."""
    import torch  # see _feature_net

    s = images.shape[1]
    cfg = get_config(name, input_size=s)
    net = _feature_net(name, s)
    feats = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size])
            views = dihedral_views(batch) if dihedral else [batch]
            f = sum(net(normalize(v.contiguous(), cfg.mean, cfg.std)) for v in views) / len(views)
            feats.append(f.float().numpy())
            if progress:
                progress(min(start + batch_size, len(images)), len(images))
    return np.concatenate(feats).astype(np.float32)


def cached_features(path: str | os.PathLike, table: pd.DataFrame, compute) -> tuple[np.ndarray, dict]:
    """Features of ``table``'s cells from the ``.npz`` at ``path`` when it holds exactly these
    paths, else ``compute() -> (X, info)`` written there (atomically) first."""
    path = Path(path)
    paths = np.asarray(table["path"].astype(str).to_numpy(), dtype=str)
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            if z["paths"].shape == paths.shape and (z["paths"] == paths).all():
                return z["X"], {"cached": True, "seconds": float(z["seconds"])}
    t0 = time.perf_counter()
    X, info = compute()
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, X=X, paths=paths, seconds=seconds)
    return X, {**info, "cached": False, "seconds": seconds}


# --------------------------------------------------------------------------- linear probes


def fit_probe(X: np.ndarray, y: Sequence[str], *, C: float = 1.0, sample_weight=None, max_iter: int = 300,
              threads: int = 1):
    """Standardised features -> logistic regression with balanced class weights.

    ``threads``: BLAS threads while fitting; one is ~10x faster than the default on a
    busy 2-core machine (measured 0.6 s against 7.4 s for 2,000 cells x 1,280 features).
    """
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter))
    with threadpool_limits(threads):
        clf.fit(X, np.asarray(y), logisticregression__sample_weight=sample_weight)
    return clf


def scores(y_true, y_pred) -> dict:
    """Accuracy, balanced accuracy and the number of cells scored."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {"n": 0, "accuracy": float("nan"), "balanced_accuracy": float("nan")}
    with warnings.catch_warnings():  # predicting a class the lab does not have is expected here
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        bacc = float(balanced_accuracy_score(y_true, y_pred))
    return {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred)), "balanced_accuracy": bacc}


def leave_one_lab_out(X: np.ndarray, table: pd.DataFrame, labs: Sequence[str] | None = None, **fit) -> pd.DataFrame:
    """For each lab L: fit on the other labs, score on L's cells of the classes they know."""
    src, y = table["source"].to_numpy(), table["label"].to_numpy()
    rows = []
    for lab in labs or list(pd.unique(src)):
        train = src != lab
        clf = fit_probe(X[train], y[train], **fit)
        test = (src == lab) & np.isin(y, clf.classes_)
        rows.append({"lab": lab, **scores(y[test], clf.predict(X[test])),
                     "n_unknown_class": int(((src == lab) & ~np.isin(y, clf.classes_)).sum())})
    return pd.DataFrame(rows)


def per_class_errors(X: np.ndarray, table: pd.DataFrame, lab: str, **fit) -> pd.DataFrame:
    """Zero-shot on ``lab`` (fit on the other labs): per true class the number of cells, the
    recall and the most frequent wrong answer with its share; classes the fit does not know
    are listed with recall NaN."""
    src, y = table["source"].to_numpy(), table["label"].to_numpy()
    clf = fit_probe(X[src != lab], y[src != lab], **fit)
    pred = clf.predict(X[src == lab])
    truth = y[src == lab]
    rows = []
    for c in sorted(pd.unique(truth)):
        p = pred[truth == c]
        wrong = pd.Series(p[p != c]).value_counts()
        rows.append({"lab": lab, "class": c, "n": int(len(p)),
                     "recall": float((p == c).mean()) if c in clf.classes_ else float("nan"),
                     "top_error": wrong.index[0] if len(wrong) else "", "top_error_share":
                     float(wrong.iloc[0] / len(p)) if len(wrong) else 0.0})
    return pd.DataFrame(rows)


def draw_kshot(labels: Sequence[str], k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``min(k, n_c - 1)`` random cells of each class ``c`` (at least one cell of each
    class is always left for scoring; a class with one cell gives none)."""
    labels = np.asarray(labels)
    picked = []
    for c in pd.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = min(k, len(idx) - 1)
        if take > 0:
            picked.append(rng.choice(idx, size=take, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, int)


def adaptation_curve(X: np.ndarray, table: pd.DataFrame, ks: Sequence[int] = KS, draws: int = 3, seed: int = 0,
                     labs: Sequence[str] | None = None, lab_weight: float = 1.0, **fit) -> pd.DataFrame:
    """For each lab L and K: fit on the other labs + K labelled cells per class of L (weighted
    ``lab_weight`` each), score on L's remaining cells of the classes the fit knows; ``draws``
    random draws per K (K = 0 is drawn once: nothing to draw)."""
    src, y = table["source"].to_numpy(), table["label"].to_numpy()
    rows = []
    for li, lab in enumerate(labs or list(pd.unique(src))):
        in_lab = np.flatnonzero(src == lab)
        others = np.flatnonzero(src != lab)
        for k in ks:
            for d in range(draws if k > 0 else 1):
                rng = np.random.default_rng([seed, li, k, d])
                shots = in_lab[draw_kshot(y[in_lab], k, rng)]
                rest = np.setdiff1d(in_lab, shots)
                train = np.concatenate([others, shots])
                w = np.concatenate([np.ones(len(others)), np.full(len(shots), float(lab_weight))])
                clf = fit_probe(X[train], y[train], sample_weight=w, **fit)
                rest = rest[np.isin(y[rest], clf.classes_)]
                rows.append({"lab": lab, "k": k, "draw": d, "n_shots": int(len(shots)),
                             **scores(y[rest], clf.predict(X[rest]))})
    return pd.DataFrame(rows)


def in_domain(X: np.ndarray, table: pd.DataFrame, lab: str = "pbc", test_size: float = 0.2, seed: int = 0,
              **fit) -> dict:
    """Fit on a stratified ``1 - test_size`` of ``lab`` alone, score on the held-out rest."""
    idx = np.flatnonzero(table["source"].to_numpy() == lab)
    y = table["label"].to_numpy()[idx]
    tr, te = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    clf = fit_probe(X[tr], table["label"].to_numpy()[tr], **fit)
    return {"lab": lab, **scores(table["label"].to_numpy()[te], clf.predict(X[te]))}


def summarize_curve(curve: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over draws of accuracy and balanced accuracy per lab and K."""
    g = curve.groupby(["lab", "k"])
    return g.agg(n=("n", "mean"), n_shots=("n_shots", "mean"), accuracy=("accuracy", "mean"),
                 accuracy_sd=("accuracy", "std"), balanced_accuracy=("balanced_accuracy", "mean"),
                 balanced_accuracy_sd=("balanced_accuracy", "std")).reset_index()


def selection_score(lolo: pd.DataFrame, curve: pd.DataFrame, k: int = 10) -> dict:
    """The declared rule: mean over labs of the leave-one-lab-out balanced accuracy, mean over
    labs of the K = ``k`` accuracy (each lab's mean over draws), and their mean (the score)."""
    zero = float(lolo["balanced_accuracy"].mean())
    kk = float(curve[curve["k"] == k].groupby("lab")["accuracy"].mean().mean())
    return {"lolo_balanced_accuracy": zero, f"k{k}_accuracy": kk, "score": (zero + kk) / 2}
