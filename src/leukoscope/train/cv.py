"""K-fold cross-validation: one model per fold, out-of-fold predictions for every image.

>>> from leukoscope.data import read_dataset
>>> from leukoscope.train import preset
>>> from leukoscope.train.cv import cross_validate
>>> res = cross_validate(read_dataset("../shared/data/pbc"), "runs/pbc_cv_fast", preset("fast"))  # doctest: +SKIP
>>> res.summary["balanced_accuracy"]                                                               # doctest: +SKIP

Writes into ``out``: ``split.csv``, ``config.json`` (effective config, data
fingerprint, folds, classes), ``fold{K}/`` (a training run each, plus
``test_predictions.csv``), ``predictions.csv`` (``path,label,fold,pred,prob_<CLASS>...``,
one row per image, from the fold where it was tested) and ``cv_summary.json``.
A fold whose model and test predictions exist is not retrained; an interrupted fold resumes
from its checkpoint. ``out`` is locked while the run writes it
(:func:`leukoscope.train.checkpoint.run_lock`), and a folder begun with other data or another
config (its ``config.json``) is refused.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from leukoscope import taxonomy
from leukoscope.data import splits
from leukoscope.data.splits import aligned_split, make_split, read_split, write_split
from leukoscope.evaluate.metrics import classification_metrics
from leukoscope.evaluate.predictions import predictions_table, write_table
from leukoscope.io import atomic_write_json
from leukoscope.models.bundle import load_bundle
from leukoscope.train.cache import build_cache
from leukoscope.train.checkpoint import RunMismatchError, check_same_data, holds_run_lock
from leukoscope.train.config import FLAT, TrainConfig, config_diff
from leukoscope.train.loop import resolve_training_scale, table_fingerprint
from leukoscope.train.trainer import train


class SmallClassWarning(UserWarning):
    """A class had too few images for the folds and was left out of cross-validation."""


@dataclass
class CVResult:
    out: Path
    predictions: pd.DataFrame
    split: pd.DataFrame
    summary: dict




def drop_small_classes(table: pd.DataFrame, folds: int, min_images: int | None = None,
                       log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """Leave out classes with fewer than ``min_images`` (default: ``folds``) images, saying so."""
    need = folds if min_images is None else min_images
    counts = table["label"].value_counts()
    small = {c: int(n) for c, n in counts.items() if n < need}
    if small:
        msg = ("classes with too few images for %d folds are left out of cross-validation: %s "
               "(each needs at least %d images so that every fold trains and tests on it)"
               % (folds, ", ".join(f"{c} ({n})" for c, n in sorted(small.items())), need))
        warnings.warn(msg, SmallClassWarning, stacklevel=2)
        log("warning: " + msg)
        table = table[~table["label"].isin(small)].reset_index(drop=True)
    if table["label"].nunique() < 2:
        raise ValueError("cross-validation needs at least two classes with enough images")
    return table, small


def _check_same_run(config_file: Path, cfg: TrainConfig, fingerprint: str) -> None:
    """Refuse a cross-validation folder begun with another config or other data."""
    if not config_file.exists():
        return
    try:
        before = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # unreadable: rewritten below
    hint = "choose a new --out, or delete it to start over"
    diff = config_diff({k: v for k, v in before.items() if k in FLAT or k in ("seed", "preset")}, cfg.to_dict())
    if diff:
        raise RunMismatchError(f"{config_file.parent} holds a cross-validation run with a different config "
                               f"({'; '.join(diff[:4])}); {hint}")
    check_same_data(before.get("data_fingerprint"), fingerprint,
                    f"{config_file.parent} holds a cross-validation run that", hint=hint)


@holds_run_lock
def cross_validate(data, out: str | os.PathLike, config: TrainConfig | None = None, *, folds: int = 5,
                   split: pd.DataFrame | str | os.PathLike | None = None, seed: int | None = None,
                   progress: bool = True, log: Callable[[str], None] = print) -> CVResult:
    """Train one model per fold and predict each image from the fold where it is tested.

    ``data`` is a :class:`~leukoscope.data.CellDataset` or its table. ``split`` is a split
    table or CSV (``path,label,fold``); without one, ``out/split.csv`` is reused when it
    exists, else a stratified (patient-wise when patients are known) split is made with
    :func:`leukoscope.data.splits.make_split` and ``seed`` (default: the config's seed).
    """

    cfg = (config or TrainConfig()).resolved()
    seed = cfg.seed if seed is None else seed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = data.table if hasattr(data, "table") else data
    table = table.reset_index(drop=True).copy()
    table["path"] = table["path"].astype(str)
    t_start = time.time()

    # ---- the split: given, reused, or made
    split_file = out / "split.csv"
    if split is not None:
        sp = read_split(split) if isinstance(split, (str, os.PathLike)) else split
        sp = aligned_split(sp, table, str(split) if isinstance(split, (str, os.PathLike)) else None)
        source = f"given ({split})" if isinstance(split, (str, os.PathLike)) else "given"
    elif split_file.exists():
        sp = aligned_split(read_split(split_file), table, str(split_file))
        source = f"reused {split_file}"
    else:
        table, _ = drop_small_classes(table, folds, log=log)
        sp = make_split(table, folds=folds, seed=seed)
        source = f"made (stratified {folds}-fold, seed {seed})"
    table = table[table["path"].isin(set(sp["path"]))].reset_index(drop=True)
    table = table.merge(sp[["path", "fold"]], on="path", how="inner")
    fold_ids = sorted(sp["fold"].unique().tolist())
    if len(fold_ids) < 2:
        raise ValueError(f"the split has {len(fold_ids)} fold(s); cross-validation needs at least 2")
    table, dropped = drop_small_classes(table, len(fold_ids), log=log)
    sp = sp[sp["path"].isin(set(table["path"]))].reset_index(drop=True)
    classes = tuple(c for c in taxonomy.CLASSES if c in set(table["label"]))
    fingerprint = table_fingerprint(table)
    _check_same_run(out / "config.json", cfg, fingerprint)
    write_split(sp, split_file)
    # the images' µm/px once for all folds (one decoded cache): a red-cell estimate uses no labels
    table, training_scale = resolve_training_scale(table, cfg.scale, log=log)
    atomic_write_json({**cfg.to_dict(), "folds": len(fold_ids), "split": source, "classes": list(classes),
                       "dropped_classes": dropped, "data_fingerprint": fingerprint,
                       "n_images": int(len(table)), "training_scale": training_scale}, out / "config.json")
    log(f"cross-validation: {len(table)} images, {len(classes)} classes, {len(fold_ids)} folds; split {source}")

    # ---- images decoded once for all folds
    has_scale = "um_per_px" in table and table["um_per_px"].notna().any()
    model_um = cfg.um_per_px if has_scale else None
    cache = None
    fold_tables = []
    for k in fold_ids:
        fold_dir = out / f"fold{k}"
        pred_file = fold_dir / "test_predictions.csv"
        if pred_file.exists() and (fold_dir / "model.safetensors").exists():
            log(f"fold {k}: finished earlier; kept")
            fold_tables.append(pd.read_csv(pred_file))
            continue
        if cache is None:
            t0 = time.time()
            cache = build_cache(table, cfg.input_size, model_um, workers=cfg.workers, progress=progress,
                                white_balance=cfg.white_balance)
            log(f"decoded {len(cache)} images at {cfg.input_size}px in {time.time() - t0:.1f}s"
                + (f"; {len(cache.errors)} unreadable, skipped" if cache.errors else ""))
            for e in cache.errors[:10]:
                log(f"  skipped {e['path']}: {e['reason']}")
        log(f"fold {k}: training on folds != {k}")
        t0 = time.time()
        fold_train, fold_test = splits.fold_tables(table, None, k)
        res = train(fold_train, fold_dir, cfg, cache=cache, progress=progress, log=log,
                    training_scale=training_scale)
        test = fold_test[fold_test["path"].isin(set(cache.paths))]
        bundle = load_bundle(res.bundle_path)
        # the cache holds the images through the bundle's pipeline (training's own preparation)
        probs = bundle.predict_proba_prepared(cache.images[torch.as_tensor(cache.rows(test["path"]))],
                                              batch_size=max(64, cfg.batch_size))
        df = predictions_table(test["path"].tolist(), probs, bundle.classes, label=test["label"].to_numpy(),
                               fold=test["fold"].to_numpy(dtype=int))
        write_table(df, pred_file)
        acc = (df["pred"] == df["label"]).mean() if len(df) else float("nan")
        log(f"fold {k}: {len(df)} test images, accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
        fold_tables.append(df)

    # ---- one table: every image once, classes of the models in taxonomy order
    preds = pd.concat(fold_tables, ignore_index=True)
    prob_cols = [f"prob_{c}" for c in taxonomy.CLASSES if f"prob_{c}" in preds]
    preds[prob_cols] = preds[prob_cols].fillna(0.0)
    preds = preds[["path", "label", "fold", "pred"] + prob_cols]
    if preds["path"].duplicated().any():
        raise RuntimeError(f"an image was predicted by more than one fold: {preds.loc[preds['path'].duplicated(), 'path'].iloc[0]}")
    order = {p: i for i, p in enumerate(sp["path"])}
    preds = preds.iloc[np.argsort([order.get(p, len(order)) for p in preds["path"]], kind="stable")].reset_index(drop=True)
    write_table(preds, out / "predictions.csv")
    summary = summarize(preds)
    summary.update({"wall_seconds_this_call": time.time() - t_start, "folds": len(fold_ids),
                    "skipped": list(cache.errors) if cache is not None else []})
    atomic_write_json(summary, out / "cv_summary.json")
    log(f"wrote {out / 'predictions.csv'}: {len(preds)} images; balanced accuracy "
        f"{summary['balanced_accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f}")
    return CVResult(out, preds, sp, summary)


def summarize(preds: pd.DataFrame) -> dict:
    """Out-of-fold balanced accuracy, macro-F1 and accuracy, overall and per fold
    (:func:`leukoscope.evaluate.metrics.classification_metrics`)."""
    def m(d):
        return classification_metrics(d["label"].to_numpy(), d["pred"].to_numpy())

    out = m(preds)
    out["per_fold"] = {int(k): m(d) for k, d in preds.groupby("fold")}
    return out
