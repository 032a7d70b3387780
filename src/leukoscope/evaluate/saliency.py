"""Saliency maps (Simonyan et al., 2014) of test images from their own fold's model.

The map of an image is the absolute gradient of the predicted class's score with
respect to the input pixels, its maximum over the colour channels
(``captum.attr.Saliency`` with ``abs=True``). :func:`select_examples` picks a few test
images per gold class, correct and wrong predictions both; :func:`saliency_examples`
loads each image's fold model (``RUN/fold{K}/model.safetensors``) and computes the maps.
Figures are drawn by :mod:`leukoscope.report.figures`; nothing here plots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from leukoscope import taxonomy
from leukoscope.imaging.images import ImageError, load_rgb
from leukoscope.models.bundle import load_bundle


def saliency_map(model, x, target) -> np.ndarray:
    """``(N, H, W)`` saliency of a batch ``x`` (``(N, C, H, W)`` tensor) for class indices ``target``.

    ``model`` is an ``nn.Module`` returning class scores; it is used in eval mode and
    left as it was.
    """
    from captum.attr import Saliency  # optional: captum only for saliency maps (importing it takes about 0.4 s)

    x = torch.as_tensor(x, dtype=torch.float32)
    if x.ndim == 3:
        x = x[None]
    if isinstance(target, (int, np.integer)):
        target = [int(target)] * x.shape[0]
    target = torch.as_tensor(np.asarray(target), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            grads = Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True)
    finally:
        model.train(was_training)
    return grads.detach().amax(dim=1).cpu().numpy()


def display_image(x_chw, mean=None, std=None) -> np.ndarray:
    """A network input ``(C, H, W)`` back to an ``(H, W, 3)`` float image in [0, 1] for display.

    Un-normalises with ``mean``/``std`` when given, else stretches to [0, 1].
    """
    arr = np.asarray(x_chw.detach().cpu().numpy() if hasattr(x_chw, "detach") else x_chw, dtype=np.float64)
    if mean is not None and std is not None:
        arr = arr * np.asarray(std, dtype=np.float64)[:, None, None] + np.asarray(mean, dtype=np.float64)[:, None, None]
        if arr.max() > 1.5:  # mean/std given in 0-255 units
            arr = arr / 255.0
    else:
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    img = np.moveaxis(arr, 0, -1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def select_examples(pred_df: pd.DataFrame, per_class: int = 2, seed: int = 0) -> pd.DataFrame:
    """Up to ``per_class`` test images per gold class, half of them wrong where there are wrong ones.

    Seeded and independent of the row order. Adds a ``correct`` column.
    """
    if per_class <= 0:
        return pred_df.iloc[:0].assign(correct=pd.Series(dtype=bool))
    rng = np.random.default_rng(seed)
    picked = []
    df = pred_df.assign(correct=pred_df["label"] == pred_df["pred"]).sort_values("path", kind="stable")
    for c in taxonomy.CLASSES:
        sub = df[df["label"] == c]
        if sub.empty:
            continue
        right, wrong = sub[sub["correct"]], sub[~sub["correct"]]
        n_wrong = min(len(wrong), per_class // 2 if per_class > 1 else 0)
        n_right = min(len(right), per_class - n_wrong)
        n_wrong = min(len(wrong), per_class - n_right)  # fill from the wrong ones when few are right
        for pool, k in ((right, n_right), (wrong, n_wrong)):
            if k:
                picked.append(pool.iloc[np.sort(rng.choice(len(pool), size=k, replace=False))])
    if not picked:
        return df.iloc[:0]
    return pd.concat(picked)


def fold_model_path(run_dir: str | os.PathLike, fold: int) -> Path:
    return Path(run_dir) / f"fold{int(fold)}" / "model.safetensors"


def _data_roots(run_dir: Path) -> list[Path]:
    roots = [run_dir]
    cfg = run_dir / "config.json"
    if cfg.exists():
        try:
            conf = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            conf = {}
        stack = [conf]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                for k, v in node.items():
                    if isinstance(v, str) and k in ("data", "data_root", "dataset", "root", "data_dir"):
                        p = Path(v)
                        roots.append(p if p.is_dir() else p.parent)
                    elif isinstance(v, (dict, list)):
                        stack.append(v)
            elif isinstance(node, list):
                stack.extend(node)
    return roots


def resolve_image(path: str, run_dir: str | os.PathLike) -> Path | None:
    """The file of a predictions-table path: as written, else relative to the run or its data root."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute():
        for root in _data_roots(Path(run_dir)):
            q = root / p
            if q.is_file():
                return q
    return None


def saliency_examples(run_dir: str | os.PathLike, pred_df: pd.DataFrame, per_class: int = 2,
                      seed: int = 0, device: str = "cpu") -> tuple[list[dict], list[str]]:
    """Saliency maps of :func:`select_examples`, each from its own fold model.

    Returns ``(examples, notes)``. Each example: ``path, label, pred, fold, correct,
    prob`` (from the predictions table), ``image`` (H, W, 3 float in [0, 1], the model's
    input un-normalised) and ``saliency`` (H, W). ``notes`` say what was skipped and why
    (fold models absent, unreadable images); nothing is raised for those. ``device``: where the fold
    models run.
    """
    run_dir = Path(run_dir)
    notes: list[str] = []
    chosen = select_examples(pred_df, per_class, seed)
    if chosen.empty:
        return [], ["no saliency maps requested" if per_class <= 0 else "no test images to explain"]
    folds = sorted(chosen["fold"].unique())
    missing = [int(f) for f in folds if not fold_model_path(run_dir, f).is_file()]
    if len(missing) == len(folds):
        return [], [f"saliency maps skipped: no fold models in {run_dir} "
                    f"(expected {', '.join(str(fold_model_path(run_dir, f).relative_to(run_dir)) for f in missing)})"]
    if missing:
        notes.append(f"no model for fold(s) {', '.join(map(str, missing))}: their images are left out")

    examples: list[dict] = []
    unreadable = []
    for fold in folds:
        if int(fold) in missing:
            continue
        bundle = load_bundle(fold_model_path(run_dir, fold), device=device)
        classes = list(bundle.classes)
        meta = getattr(bundle, "meta", {}) or {}
        sub = chosen[chosen["fold"] == fold]
        rows, imgs, ums = [], [], []
        for row in sub.itertuples(index=False):
            src = resolve_image(row.path, run_dir)
            if src is None:
                unreadable.append(f"{row.path} (not found)")
                continue
            try:
                imgs.append(load_rgb(src))
            except ImageError as exc:
                unreadable.append(f"{row.path} ({exc.reason})")
                continue
            um = getattr(row, "um_per_px", None)
            ums.append(None if um is None or not np.isfinite(um) else float(um))
            rows.append(row)
        if not rows:
            continue
        x = bundle.preprocess(imgs, um_per_px=ums)  # one batch per fold model
        sal = saliency_map(bundle.model, x, [classes.index(r.pred) for r in rows])
        for i, row in enumerate(rows):
            prob_col = f"prob_{row.pred}"
            examples.append({
                "path": row.path, "label": row.label, "pred": row.pred, "fold": int(fold),
                "correct": bool(row.correct),
                "prob": float(getattr(row, prob_col)) if hasattr(row, prob_col) else float("nan"),
                "image": display_image(x[i], meta.get("mean"), meta.get("std")),
                "saliency": sal[i],
            })
    if unreadable:
        notes.append(f"{len(unreadable)} selected image(s) could not be read: " + "; ".join(unreadable[:5])
                     + (" ..." if len(unreadable) > 5 else ""))
    order = {c: i for i, c in enumerate(taxonomy.CLASSES)}
    examples.sort(key=lambda e: (order[e["label"]], not e["correct"], e["path"]))
    return examples, notes
