"""Stratified hold-out, stratified k-fold and patient-wise k-fold splits.

A split is a table ``path,label,fold[,patient]`` where ``fold`` is the test fold of
each image: every image is in exactly one test fold. For the 80/20 hold-out,
fold 0 is the test set and fold 1 the training set. Splits are deterministic for a
seed and independent of the order in which images were read.

>>> import pandas as pd
>>> t = pd.DataFrame({"path": [f"{i}.png" for i in range(10)], "label": ["NGS"] * 5 + ["LYT"] * 5})
>>> make_split(t, folds=5, seed=0)["fold"].value_counts().sort_index().tolist()
[2, 2, 2, 2, 2]
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

SPLIT_COLUMNS = ["path", "label", "fold"]


class SplitWarning(UserWarning):
    """A split was made, but with a caveat the user should see (e.g. a tiny class)."""


def _has_patients(table: pd.DataFrame) -> bool:
    return "patient" in table and table["patient"].notna().all() and table["patient"].astype(str).str.len().gt(0).all()


def make_split(table: pd.DataFrame, folds: int = 5, seed: int = 0, holdout: float | None = None,
               by_patient: str | bool = "auto") -> pd.DataFrame:
    """Assign each image a test fold.

    Parameters
    ----------
    table : DataFrame with ``path`` and ``label`` (and ``patient`` for patient-wise splits).
    folds : number of folds for k-fold cross-validation (>= 2).
    seed : random seed; the same seed and images always give the same split.
    holdout : if given (e.g. 0.2), a stratified hold-out instead: fold 0 = test, fold 1 = train.
    by_patient : ``"auto"`` groups by patient when every image has one; ``True`` requires it.

    Classes with fewer images than folds are kept (some folds then lack them) and
    announced with a :class:`SplitWarning`.
    """
    if len(table) == 0:
        raise ValueError("cannot split an empty dataset")
    df = table.sort_values("path", kind="stable").reset_index(drop=True)
    labels = df["label"].astype(str).to_numpy()
    counts = pd.Series(labels).value_counts()
    grouped = _has_patients(df) if by_patient == "auto" else bool(by_patient)
    if grouped and not _has_patients(df):
        raise ValueError("a patient-wise split needs a non-empty 'patient' for every image")
    out = df[["path", "label"] + (["patient"] if "patient" in df and df["patient"].notna().any() else [])].copy()

    if holdout is not None:
        if not 0 < holdout < 1:
            raise ValueError(f"holdout must be a fraction between 0 and 1, got {holdout}")
        idx = np.arange(len(df))
        strat = labels if counts.min() >= 2 else None
        if strat is None:
            warnings.warn(
                f"classes with a single image ({', '.join(counts[counts < 2].index)}) cannot be stratified; "
                "hold-out split made without stratification", SplitWarning, stacklevel=2)
        if grouped:
            groups = df["patient"].astype(str).to_numpy()
            ug = np.unique(groups)
            _, test_g = train_test_split(ug, test_size=holdout, random_state=seed)
            test = np.isin(groups, test_g)
        else:
            _, test_idx = train_test_split(idx, test_size=holdout, random_state=seed, stratify=strat)
            test = np.zeros(len(df), bool)
            test[test_idx] = True
        out["fold"] = np.where(test, 0, 1)
        return out

    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if len(df) < folds:
        raise ValueError(f"cannot make {folds} folds from {len(df)} images")
    small = counts[counts < folds]
    if len(small):
        warnings.warn(
            "classes with fewer images than folds: "
            + ", ".join(f"{c} ({n})" for c, n in small.items())
            + f"; some of the {folds} test folds will have none of them", SplitWarning, stacklevel=2)
    fold = np.full(len(df), -1, dtype=int)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        if grouped:
            groups = df["patient"].astype(str).to_numpy()
            n_groups = len(np.unique(groups))
            if n_groups < folds:
                raise ValueError(f"cannot make {folds} patient-wise folds from {n_groups} patients")
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = splitter.split(np.zeros(len(df)), labels, groups)
        else:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = splitter.split(np.zeros(len(df)), labels)
        for k, (_, test_idx) in enumerate(parts):
            fold[test_idx] = k
    assert (fold >= 0).all()
    out["fold"] = fold
    return out


def write_split(split: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a split CSV atomically."""
    from leukoscope.io import atomic_write_csv

    cols = SPLIT_COLUMNS + (["patient"] if "patient" in split else [])
    return atomic_write_csv(split[cols], path)


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """Read a split CSV written by :func:`write_split` (or by hand), checking its columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: split file not found")
    df = pd.read_csv(path, dtype={"path": str, "label": str})
    missing = [c for c in SPLIT_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"{path}: split file lacks column(s) {missing}")
    if df["path"].duplicated().any():
        raise ValueError(f"{path}: image listed in more than one fold, e.g. {df.loc[df['path'].duplicated(), 'path'].iloc[0]}")
    df["fold"] = df["fold"].astype(int)
    return df
