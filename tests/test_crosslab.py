"""The cross-lab benchmark's library part on tiny synthetic labs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukoscope.evaluate import crosslab as cl
from leukoscope.synth import make_cell

CLASSES = ("LYT", "NGS", "EOS")


def _write_folders(root, n=4, tint=(1.0, 1.0, 1.0), seed=0):
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = make_cell(c, seed=seed + 100 * ci + i, size=48).astype(float) * np.asarray(tint)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{c}_{i}.png")


@pytest.fixture
def labs(tmp_path):
    _write_folders(tmp_path / "a", n=4)
    _write_folders(tmp_path / "b", n=3, tint=(0.9, 1.0, 0.8), seed=1000)
    pool = tmp_path / "pool"
    rows = []
    for sub, label in (("x", "LYT"), ("x", "NGS"), ("y", "EOS")):
        (pool / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_cell(label, seed=7, size=48)).save(pool / sub / f"{label}.png")
        rows.append({"path": f"{sub}/{label}.png", "label": label})
    pd.DataFrame(rows).to_csv(pool / "labels.csv", index=False)
    return [cl.LabSpec("a", str(tmp_path / "a")), cl.LabSpec("b", str(tmp_path / "b")),
            cl.parse_lab(f"x={pool}:x")]


def test_parse_lab_and_errors():
    assert cl.parse_lab("m=/d/lab") == cl.LabSpec("m", "/d/lab", None)
    with pytest.raises(ValueError, match="expected name=PATH"):
        cl.parse_lab("/d/lab")


def test_read_labs_names_sources_and_keeps_the_prefix_only(labs):
    t = cl.read_labs(labs)
    assert t.groupby("source").size().to_dict() == {"a": 12, "b": 9, "x": 2}
    assert sorted(t[t.source == "x"].label) == ["LYT", "NGS"]  # y/EOS.png is another lab's
    assert "um_per_px" in t
    with pytest.raises(ValueError, match="lab names must be unique"):
        cl.read_labs([labs[0], labs[0]])
    with pytest.raises(ValueError, match="no labelled cells .* under 'z'"):
        cl.read_labs([cl.LabSpec("z", labs[2].path, "z")])


def test_qualifying_labs_need_enough_cells_in_enough_classes():
    t = pd.DataFrame({"source": ["big"] * 60 + ["two"] * 40 + ["small"] * 30,
                      "label": ["A"] * 20 + ["B"] * 20 + ["C"] * 20 + ["A"] * 20 + ["B"] * 20 + ["A", "B", "C"] * 10})
    assert cl.qualifying_labs(t) == ["big"]
    assert cl.qualifying_labs(t, min_cells=10) == ["big", "small"]


def test_draw_kshot_leaves_a_cell_of_each_class_to_score():
    y = np.array(["A"] * 5 + ["B"] * 2 + ["C"])
    rng = np.random.default_rng(0)
    idx = cl.draw_kshot(y, 10, rng)
    assert sorted(y[idx]) == ["A"] * 4 + ["B"]
    assert len(cl.draw_kshot(y, 0, rng)) == 0
    assert sorted(y[cl.draw_kshot(y, 1, rng)]) == ["A", "B"]


@pytest.mark.slow
def test_images_features_and_cache(labs, tmp_path):
    t = cl.read_labs(labs)
    imgs, info = cl.prepare_images(t, 32)
    assert imgs.shape == (len(t), 32, 32, 3) and imgs.dtype == np.uint8 and info["white_balance"]
    t2 = t.assign(um_per_px=0.2)  # stated scale: the physical policy resamples instead of resizing
    phys, _ = cl.prepare_images(t2, 32, scale="physical", model_um_per_px=0.4)
    assert phys.shape == imgs.shape and not np.array_equal(phys, imgs)
    calls = []

    def compute():
        calls.append(1)
        return cl.extract_features("mobilenet_v2", imgs[:4], dihedral=True, batch_size=3), {}

    X, meta = cl.cached_features(tmp_path / "f.npz", t.iloc[:4], compute)
    assert X.shape == (4, 1280) and np.isfinite(X).all() and not meta["cached"]
    X2, meta2 = cl.cached_features(tmp_path / "f.npz", t.iloc[:4], compute)
    assert meta2["cached"] and np.array_equal(X, X2) and len(calls) == 1
    single = cl.extract_features("mobilenet_v2", imgs[:4])
    assert not np.allclose(single, X, atol=1e-4)  # the 8-view mean is not the single view


def _toy_features(seed=0):
    """Three labs, four classes: class signal shared, each lab shifted; lab 'c' lacks class D."""
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    centres = rng.normal(0, 3, (4, 8))
    for lab, n in (("a", 30), ("b", 30), ("c", 12)):
        shift = rng.normal(0, 1, 8)
        for ci, c in enumerate("ABCD"):
            if lab == "c" and c == "D":
                continue
            for _ in range(n):
                rows.append({"source": lab, "label": c})
                feats.append(centres[ci] + shift + rng.normal(0, 0.5, 8))
    return np.asarray(feats), pd.DataFrame(rows)


def test_protocols_on_separable_features():
    X, t = _toy_features()
    lolo = cl.leave_one_lab_out(X, t)
    assert list(lolo.lab) == ["a", "b", "c"]
    assert lolo.set_index("lab").loc["c", "n"] == 36 and (lolo.accuracy > 0.9).all()
    curve = cl.adaptation_curve(X, t, ks=(0, 3), draws=2)
    assert len(curve) == 3 * (1 + 2)
    c3 = curve[(curve.lab == "c") & (curve.k == 3)]
    assert (c3.n_shots == 9).all() and (c3.n == 27).all()  # 3 classes x 3 shots, the other 9 each scored
    summary = cl.summarize_curve(curve)
    assert set(summary.columns) >= {"lab", "k", "accuracy", "accuracy_sd"}
    sel = cl.selection_score(lolo, curve, k=3)
    assert sel["score"] == pytest.approx((sel["lolo_balanced_accuracy"] + sel["k3_accuracy"]) / 2)
    errs = cl.per_class_errors(X, t, "c").set_index("class")
    assert list(errs.n) == [12, 12, 12] and (errs.recall > 0.9).all()
    X_bad = X.copy()
    X_bad[(t.source == "c").to_numpy() & (t.label == "A").to_numpy()] = X[(t.label == "B").to_numpy()][:12]
    errs = cl.per_class_errors(X_bad, t, "c").set_index("class")
    assert errs.loc["A", "top_error"] == "B" and errs.loc["A", "recall"] < 0.2
    indom = cl.in_domain(X, t, lab="a")
    assert indom["n"] == 24 and indom["balanced_accuracy"] > 0.9
