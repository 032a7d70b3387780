"""Splits: stratified hold-out, stratified and patient-wise k-fold, the validation split, split files.

Every command that picks images by split goes through this module: :func:`make_split`
makes one, :func:`read_split`/:func:`write_split` store it, :func:`align_split` matches a
split file's paths to a dataset's table (absolute, or relative to the split file's folder),
:func:`fold_tables` cuts an aligned table into a fold's training and test images, and
:func:`stratified_val_split` takes the validation images out of a training table.

A split is a table ``path,label,fold[,patient]`` where ``fold`` is the test fold of
each image: every image is in exactly one test fold. For the 80/20 hold-out,
fold 0 is the test set and fold 1 the training set. Splits are deterministic for a
seed and independent of the order in which images were read.

>>> import pandas as pd
>>> t = pd.DataFrame({"path": [f"{i}.png" for i in range(10)], "label": ["NGS"] * 5 + ["LYT"] * 5})
>>> sp = make_split(t, folds=5, seed=0)
>>> sp["fold"].value_counts().sort_index().tolist()
[2, 2, 2, 2, 2]
>>> train, test = fold_tables(align_split(t, sp), sp, fold=0)
>>> len(train), len(test)
(8, 2)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from leukoscope.io import atomic_write_csv

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


def stratified_val_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): per class ``round(fraction * n)`` to validation, at least one image left to train.

    Classes with fewer than 3 images keep all of them for training.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 0x7A1])
    tr, va = [], []
    for cls in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_val = 0 if n < 3 or fraction <= 0 else min(n - 1, max(1, int(round(fraction * n))))
        va.append(members[:n_val])
        tr.append(members[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def aligned_split(split: pd.DataFrame, table: pd.DataFrame, split_path: str | os.PathLike | None = None,
                  stacklevel: int = 3) -> pd.DataFrame:
    """The split's rows whose ``path`` is one of ``table``'s, paths spelt as in ``table``.

    A split file written elsewhere may list paths relative to its own folder: when none of
    its paths is in the table as written, they are resolved against ``split_path``'s folder.
    Split rows not in the table, and table rows not in the split, are reported with a
    ``RuntimeWarning``; a split that lists none of the table's images is an error.
    """
    known = set(table["path"].astype(str))
    sp = split.copy()
    sp["path"] = sp["path"].astype(str)
    if not sp["path"].isin(known).any() and split_path:
        base = Path(split_path).resolve().parent
        sp["path"] = [str((base / p).resolve()) if not os.path.isabs(p) else p for p in sp["path"]]
    missing = ~sp["path"].isin(known)
    where = f"{split_path}: " if split_path else ""
    if missing.all():
        raise ValueError(f"{where}the split lists none of the dataset's images; was it made for another dataset?")
    if missing.any():
        warnings.warn(f"{where}{int(missing.sum())} images of the split are not in the dataset and are ignored, "
                      f"e.g. {sp.loc[missing, 'path'].iloc[0]}", RuntimeWarning, stacklevel=stacklevel)
    unsplit = len(known - set(sp["path"]))
    if unsplit:
        warnings.warn(f"{where}{unsplit} images of the dataset are not in the split and are not used",
                      RuntimeWarning, stacklevel=stacklevel)
    return sp[~missing].reset_index(drop=True)


def align_split(table: pd.DataFrame, split: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """``table``'s rows that ``split`` (a split table or CSV) lists, with their ``fold`` column added.

    Paths are matched as :func:`aligned_split` does (a split file's relative paths are resolved
    against its folder); the result keeps ``table``'s row order and columns.
    """
    split_path = split if isinstance(split, (str, os.PathLike)) else None
    sp = read_split(split) if split_path is not None else split
    sp = aligned_split(sp, table, split_path, stacklevel=4)
    out = table.drop(columns=["fold"], errors="ignore").copy()
    out["path"] = out["path"].astype(str)
    fold = dict(zip(sp["path"], sp["fold"].astype(int)))
    out = out[out["path"].isin(fold)].reset_index(drop=True)
    out["fold"] = out["path"].map(fold).astype(int)
    return out


def fold_tables(table: pd.DataFrame, split: pd.DataFrame | str | os.PathLike | None, fold: int
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, test)``: the rows of ``table`` outside and inside test fold ``fold``.

    ``table`` either has a ``fold`` column already (``split=None``, e.g. from :func:`align_split`)
    or is aligned with ``split`` first. An unknown fold is an error naming the folds there are.
    """
    aligned = table if split is None else align_split(table, split)
    if "fold" not in aligned:
        raise ValueError("fold_tables needs a split, or a table with a 'fold' column")
    folds = sorted(set(aligned["fold"].astype(int)))
    if int(fold) not in folds:
        name = f" of {split}" if isinstance(split, (str, os.PathLike)) else ""
        raise ValueError(f"fold {fold} is not in the split{name} (folds: {folds})")
    test = aligned["fold"].astype(int) == int(fold)
    return aligned[~test].reset_index(drop=True), aligned[test].reset_index(drop=True)
