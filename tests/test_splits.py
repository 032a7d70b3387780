"""Split invariants, including property-based checks."""

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from leukoscope.cli.main import main
from leukoscope.data.splits import SplitWarning, make_split, read_split, write_split


def _table(counts, patients=None):
    rows = []
    for lab, n in counts.items():
        rows += [{"path": f"{lab}/{lab}_{i:04d}.tiff", "label": lab} for i in range(n)]
    df = pd.DataFrame(rows)
    if patients:
        df["patient"] = [f"p{i % patients}" for i in range(len(df))]
    return df


@settings(max_examples=40, deadline=None)
@given(counts=st.dictionaries(st.sampled_from(["NGS", "LYT", "MYO", "MON", "EOS"]),
                              st.integers(5, 40), min_size=2, max_size=5),
       folds=st.integers(2, 5), seed=st.integers(0, 1000))
def test_every_image_in_exactly_one_fold_and_stratified(counts, folds, seed):
    t = _table(counts)
    s = make_split(t, folds=folds, seed=seed)
    assert sorted(s["path"]) == sorted(t["path"])
    assert set(s["fold"]) == set(range(folds))
    for lab, n in counts.items():
        per_fold = s[s["label"] == lab]["fold"].value_counts().reindex(range(folds), fill_value=0)
        assert per_fold.max() - per_fold.min() <= 1  # stratified
    # deterministic and independent of input order
    s2 = make_split(t.sample(frac=1, random_state=seed), folds=folds, seed=seed)
    assert s.set_index("path")["fold"].equals(s2.set_index("path")["fold"].loc[s["path"]])


def test_seed_changes_split():
    t = _table({"NGS": 50, "LYT": 50})
    assert not make_split(t, seed=0)["fold"].equals(make_split(t, seed=1)["fold"])


def test_holdout_80_20():
    t = _table({"NGS": 100, "LYT": 50})
    s = make_split(t, holdout=0.2, seed=3)
    assert (s["fold"] == 0).sum() == 30
    assert (s[(s.fold == 0)].label.value_counts() == pd.Series({"NGS": 20, "LYT": 10})).all()


def test_small_class_warns_not_crashes():
    t = _table({"NGS": 30, "LYA": 2})
    with pytest.warns(SplitWarning, match=r"LYA \(2\)"):
        s = make_split(t, folds=5)
    assert len(s) == 32 and s[s.label == "LYA"]["fold"].nunique() == 2


@settings(max_examples=20, deadline=None)
@given(n_pat=st.integers(5, 12), seed=st.integers(0, 100))
def test_patient_wise_groups_never_straddle(n_pat, seed):
    t = _table({"MYO": 40, "NGS": 40}, patients=n_pat)
    s = make_split(t, folds=5, seed=seed)
    assert s.groupby("patient")["fold"].nunique().max() == 1
    assert sorted(s["path"]) == sorted(t["path"])


def test_patient_required_but_missing():
    with pytest.raises(ValueError, match="patient"):
        make_split(_table({"NGS": 10}), by_patient=True)
    with pytest.raises(ValueError, match="3 images"):
        make_split(_table({"NGS": 3}), folds=5)


def test_roundtrip_and_cli(tmp_path, pbc_root):
    out = tmp_path / "split.csv"
    assert main(["split", str(pbc_root), "--folds", "5", "--seed", "0", "--out", str(out)]) == 0
    s = read_split(out)
    assert list(s.columns[:3]) == ["path", "label", "fold"] and len(s) == 4321
    assert s["fold"].value_counts().between(860, 870).all()
    write_split(s, tmp_path / "again.csv")
    assert read_split(tmp_path / "again.csv").equals(s)
