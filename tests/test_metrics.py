"""Metric code against hand-computed answers and scikit-learn: Table 1, bootstrap, ROC, calibration."""

import math
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from leukoscope import taxonomy
from leukoscope.evaluate import binary, calibration, metrics


def frame(rows, classes=None, fold_col=True):
    """Predictions table from (fold, gold, pred) rows; the predicted class gets probability 0.7."""
    df = pd.DataFrame(rows, columns=["fold", "label", "pred"])
    df.insert(0, "path", [f"/d/{g}/{g}_{i:04d}.tiff" for i, g in enumerate(df["label"])])
    classes = classes or sorted(set(df["label"]) | set(df["pred"]), key=taxonomy.class_index)
    for c in classes:
        df[f"prob_{c}"] = np.where(df["pred"] == c, 0.7, 0.3 / (len(classes) - 1))
    if not fold_col:
        df = df.drop(columns="fold")
    return df


# 3 classes, 2 folds; every count below was worked out by hand.
HAND = frame([
    (0, "LYT", "LYT"), (0, "LYT", "MON"), (0, "MON", "MON"), (0, "NGS", "NGS"), (0, "NGS", "LYT"),
    (1, "LYT", "LYT"), (1, "MON", "NGS"), (1, "MON", "MON"), (1, "NGS", "NGS"), (1, "NGS", "NGS"), (1, "NGS", "NGS"),
])


def test_per_fold_metrics_by_hand():
    fm = metrics.per_class_fold_metrics(HAND).set_index(["fold", "class"])
    expect = {  # (precision, sensitivity, specificity)
        (0, "LYT"): (1 / 2, 1 / 2, 2 / 3), (0, "MON"): (1 / 2, 1, 3 / 4), (0, "NGS"): (1, 1 / 2, 1),
        (1, "LYT"): (1, 1, 1), (1, "MON"): (1, 1 / 2, 1), (1, "NGS"): (3 / 4, 1, 2 / 3),
    }
    for key, (p, s, sp) in expect.items():
        row = fm.loc[key]
        assert (row["precision"], row["sensitivity"], row["specificity"]) == pytest.approx((p, s, sp)), key
    assert fm.loc[(1, "NGS"), ["tp", "fp", "fn", "tn"]].tolist() == [3, 1, 0, 2]


def test_table1_by_hand():
    t = metrics.table1(HAND).set_index("class")
    assert list(metrics.table1(HAND).columns[:9]) == [
        "class", "name", "n_images", "precision_mean", "precision_sd", "sensitivity_mean", "sensitivity_sd",
        "specificity_mean", "specificity_sd"]
    sd_half = np.std([0.5, 1.0], ddof=1)
    assert t.loc["LYT", ["n_images", "precision_mean", "precision_sd", "sensitivity_mean", "specificity_mean"]].tolist() \
        == pytest.approx([3, 0.75, sd_half, 0.75, 5 / 6])
    assert t.loc["MON", "specificity_mean"] == pytest.approx(0.875)
    assert t.loc["MON", "specificity_sd"] == pytest.approx(np.std([0.75, 1.0], ddof=1))
    assert t.loc["NGS", ["n_images", "precision_mean", "sensitivity_sd"]].tolist() == pytest.approx([5, 0.875, sd_half])
    assert (t["precision_folds"] == 2).all() and (t["n_folds"] == 2).all()
    assert t.loc["NGS", "name"] == "Neutrophil (segmented)" and t.loc["NGS", "group"] == "mature"


def test_class_absent_from_a_fold_and_never_predicted():
    df = frame([
        (0, "LYT", "LYT"), (0, "NGS", "NGS"), (0, "BAS", "LYT"),
        (1, "LYT", "LYT"), (1, "NGS", "NGS"), (1, "EOS", "EOS"), (1, "BAS", "NGS"),
    ], classes=["BAS", "EOS", "LYT", "MYO", "NGS"])
    fm = metrics.per_class_fold_metrics(df).set_index(["fold", "class"])
    # EOS has no image in fold 0 and is not predicted there: precision and sensitivity undefined
    assert math.isnan(fm.loc[(0, "EOS"), "precision"]) and math.isnan(fm.loc[(0, "EOS"), "sensitivity"])
    assert fm.loc[(0, "EOS"), "specificity"] == 1.0
    assert fm.loc[(1, "EOS"), "sensitivity"] == 1.0
    t = metrics.table1(df).set_index("class")
    assert t.loc["EOS", "sensitivity_folds"] == 1 and t.loc["EOS", "sensitivity_mean"] == 1.0
    assert math.isnan(t.loc["EOS", "sensitivity_sd"])  # one defined fold: no sd
    # BAS is never predicted: precision undefined everywhere, sensitivity a real 0
    assert t.loc["BAS", "precision_folds"] == 0 and math.isnan(t.loc["BAS", "precision_mean"])
    assert t.loc["BAS", "sensitivity_mean"] == 0.0 and t.loc["BAS", "sensitivity_folds"] == 2
    # MYO: a model class with no image and no prediction
    assert t.loc["MYO", "n_images"] == 0 and t.loc["MYO", "sensitivity_folds"] == 0
    assert list(t.index) == ["BAS", "EOS", "LYT", "MYO", "NGS"]  # taxonomy order, union of gold and model


def test_gold_labels_outside_the_model_are_in_the_report():
    df = frame([(0, "LYT", "LYT"), (0, "MYO", "LYT"), (0, "NGS", "NGS")], classes=["LYT", "NGS"])
    assert metrics.report_classes(df) == ["LYT", "MYO", "NGS"]
    t = metrics.table1(df).set_index("class")
    assert t.loc["MYO", "sensitivity_mean"] == 0.0 and math.isnan(t.loc["MYO", "precision_mean"])


def test_confusion_fractions():
    conf = metrics.confusion_fractions(HAND)
    cm = confusion_matrix(HAND["label"], HAND["pred"], labels=["LYT", "MON", "NGS"])
    assert conf["n_images"].tolist() == [3, 3, 5]
    np.testing.assert_allclose(conf[["LYT", "MON", "NGS"]].to_numpy(), cm / cm.sum(1, keepdims=True))


def test_validation_messages():
    with pytest.raises(ValueError, match="label"):
        metrics.validate_predictions(HAND.drop(columns="label"))
    bad = HAND[["path", "label", "fold", "pred", "prob_NGS", "prob_LYT", "prob_MON"]]
    with pytest.raises(ValueError, match="taxonomy order"):
        metrics.validate_predictions(bad)
    with pytest.raises(ValueError, match="not among the model's classes"):
        metrics.validate_predictions(HAND.drop(columns="prob_MON"))
    blank = HAND.astype({"prob_MON": object})
    blank.loc[3, "prob_MON"] = ""
    with pytest.raises(ValueError, match="1 rows hold missing"):
        metrics.validate_predictions(blank)
    no_fold = frame([(0, "LYT", "LYT"), (0, "NGS", "NGS")], fold_col=False)
    assert (metrics.validate_predictions(no_fold)["fold"] == 0).all()


def random_predictions(n, classes, seed=0, folds=5, acc=0.8):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(len(classes)) * 0.7)
    y = rng.choice(len(classes), size=n, p=w)
    p = np.where(rng.random(n) < acc, y, rng.integers(0, len(classes), n))
    df = pd.DataFrame({"path": [f"/x/{i}.png" for i in range(n)], "label": np.array(classes)[y],
                       "fold": rng.integers(0, folds, n), "pred": np.array(classes)[p]})
    logits = rng.normal(0, 1, (n, len(classes)))
    logits[np.arange(n), p] += 3
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for k, c in enumerate(classes):
        df[f"prob_{c}"] = prob[:, k]
    return df


def test_vectorised_metrics_match_sklearn_on_resamples():
    classes = list(taxonomy.CLASSES)
    df = random_predictions(400, classes, seed=3)
    rng = np.random.default_rng(0)
    gold_classes = [c for c in classes if c in set(df["label"])]
    mask = np.isin(classes, gold_classes)
    for _ in range(5):  # resamples lose rare classes: NaN handling must match scikit-learn's
        s = df.iloc[rng.integers(0, len(df), len(df))]
        cm = confusion_matrix(s["label"], s["pred"], labels=classes)
        m = metrics.metrics_from_confusions(cm, mask)
        assert m["macro_f1"] == pytest.approx(
            f1_score(s["label"], s["pred"], labels=gold_classes, average="macro", zero_division=np.nan))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
            bal = balanced_accuracy_score(s["label"], s["pred"])
        assert m["balanced_accuracy"] == pytest.approx(bal)
        np.testing.assert_allclose(m["f1"], f1_score(s["label"], s["pred"], labels=classes, average=None,
                                                     zero_division=np.nan), equal_nan=True)


def test_overall_point_estimates_are_sklearns():
    classes = ["EOS", "LYT", "MON", "NGS"]
    df = random_predictions(300, classes, seed=1)
    o = metrics.overall_metrics(df, n_boot=200)
    assert o["macro_f1"]["value"] == pytest.approx(f1_score(df["label"], df["pred"], average="macro"))
    assert o["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(df["label"], df["pred"]))
    for key in ("macro_f1", "balanced_accuracy", "accuracy"):
        assert o[key]["lo"] <= o[key]["value"] <= o[key]["hi"]
    assert o["f1"]["LYT"]["lo"] < o["f1"]["LYT"]["hi"]


def test_multinomial_bootstrap_is_the_image_bootstrap():
    classes = ["EOS", "LYT", "MON", "NGS"]
    df = random_predictions(250, classes, seed=2)
    y, p = metrics._codes(df, classes)
    fast = metrics.metrics_from_confusions(metrics.bootstrap_confusions(y, p, 4, n_boot=4000, seed=1))["macro_f1"]
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(y), (4000, len(y)))
    codes = (y * 4 + p)[idx] + (np.arange(4000) * 16)[:, None]
    slow_cm = np.bincount(codes.ravel(), minlength=4000 * 16).reshape(4000, 4, 4)
    slow = metrics.metrics_from_confusions(slow_cm)["macro_f1"]
    assert np.mean(fast) == pytest.approx(np.mean(slow), abs=0.005)
    assert np.std(fast) == pytest.approx(np.std(slow), rel=0.1)
    assert np.percentile(fast, 2.5) == pytest.approx(np.percentile(slow, 2.5), abs=0.01)


def test_bootstrap_seeded_and_fast():
    classes = list(taxonomy.CLASSES)
    df = random_predictions(20_000, classes, seed=4)
    t0 = time.perf_counter()
    a = metrics.bootstrap_ci(df["label"], df["pred"], classes, n_boot=1000, seed=5)
    assert time.perf_counter() - t0 < 3.0
    b = metrics.bootstrap_ci(df["label"], df["pred"], classes, n_boot=1000, seed=5)
    assert a == b
    c = metrics.bootstrap_ci(df["label"], df["pred"], classes, n_boot=1000, seed=6)
    assert a != c
    width_big = a["macro_f1"]["hi"] - a["macro_f1"]["lo"]
    small = df.iloc[:500]
    s = metrics.bootstrap_ci(small["label"], small["pred"], classes, n_boot=1000, seed=5)
    assert s["macro_f1"]["hi"] - s["macro_f1"]["lo"] > width_big


# ------------------------------------------------------------------ binary questions

def scored(rows, classes):
    """rows: (fold, gold, {class: prob})"""
    recs = []
    for i, (fold, gold, probs) in enumerate(rows):
        rec = {"path": f"/d/{gold}/{i}.tiff", "label": gold, "fold": fold, "pred": max(probs, key=probs.get)}
        rec.update({f"prob_{c}": probs.get(c, 0.0) for c in classes})
        recs.append(rec)
    return pd.DataFrame(recs)


def test_roc_over_folds_matches_sklearn():
    classes = list(taxonomy.CLASSES)
    df = random_predictions(600, classes, seed=8, folds=3)
    r = binary.binary_roc_over_folds(df, "blast")
    score = df["prob_MYO"] + df["prob_MOB"]
    truth = df["label"].isin(["MYO", "MOB"])
    aucs = [roc_auc_score(truth[df["fold"] == f], score[df["fold"] == f]) for f in range(3)]
    assert r["auc_mean"] == pytest.approx(np.mean(aucs))
    assert r["auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert r["auc_pooled"] == pytest.approx(roc_auc_score(truth, score))
    assert (r["n_pos"], r["n_neg"]) == (int(truth.sum()), int((~truth).sum()))
    assert len(r["tpr_mean"]) == len(r["fpr_grid"]) and r["tpr_mean"][0] == 0 and r["tpr_mean"][-1] == 1
    assert "undefined_reason" not in r


def test_binary_undefined_without_positives_and_in_a_fold():
    classes = ["LYT", "MYO", "NGS"]
    no_blast = scored([(0, "LYT", {"LYT": .9, "MYO": .1}), (1, "NGS", {"NGS": .8, "MYO": .2})], classes)
    r = binary.binary_roc_over_folds(no_blast, "blast")
    assert "no positive images" in r["undefined_reason"] and r["n_pos"] == 0
    assert math.isnan(r["auc_mean"]) and "tpr_mean" not in r
    one_fold = scored([(0, "LYT", {"LYT": .9, "MYO": .1}), (0, "MYO", {"MYO": .7, "LYT": .3}),
                       (1, "NGS", {"NGS": .8, "MYO": .2}), (1, "LYT", {"LYT": .6, "MYO": .4})], classes)
    r = binary.binary_roc_over_folds(one_fold, "blast")
    assert "undefined_reason" not in r and r["n_folds_defined"] == 1 and r["auc_mean"] == 1.0
    assert math.isnan(r["auc_sd"])
    assert "no positive images" in r["folds"][1]["undefined_reason"]
    all_blast = scored([(0, "MYO", {"MYO": .9, "LYT": .1}), (1, "MOB", {"MYO": .2, "LYT": .8})], classes)
    assert "no negative images" in binary.binary_roc_over_folds(all_blast, "blast")["undefined_reason"]


def test_binary_scores_of_a_model_without_some_classes():
    classes = ["LYT", "NGS"]  # a PBC-like model knows no blast class
    df = scored([(0, "LYT", {"LYT": .9, "NGS": .1}), (0, "MYO", {"LYT": .5, "NGS": .5})], classes)
    r = binary.binary_roc_over_folds(df, "blast")
    assert "knows none" in r["note"] and r["auc_mean"] == 0.5
    assert r["model_point"]["sensitivity"] == 0.0


# ------------------------------------------------------------------ calibration

def test_ece_by_hand_and_edges():
    r = calibration.expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 1, 1, 0], n_bins=10)
    assert r["ece"] == pytest.approx(0.1) and r["n"] == 4 and r["mce"] == pytest.approx(0.1)
    r = calibration.expected_calibration_error([0.0, 1.0, 1.0], [0, 1, 1], n_bins=5)
    assert r["ece"] == pytest.approx(0.0)
    assert r["bins"][0]["n"] == 1 and r["bins"][-1]["n"] == 2
    with pytest.raises(ValueError):
        calibration.expected_calibration_error([1.2], [1])


def test_ece_calibrated_model_is_small():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1, 50_000)
    r = calibration.expected_calibration_error(conf, rng.random(50_000) < conf)
    assert r["ece"] < 0.02
    df = random_predictions(300, ["EOS", "LYT", "NGS"])
    r = calibration.calibration_of_predictions(df)
    assert r["accuracy"] == pytest.approx((df["label"] == df["pred"]).mean())


# ------------------------------------------------------------------ model vs examiners

def test_model_vs_examiners():
    pred = frame([(0, "MYO", "MYO"), (0, "MYO", "MON"), (0, "NGS", "NGS"), (1, "LYT", "LYT"), (1, "NGS", "LYT")])
    pred["path"] = ["/data/lmu/MYO/MYO_0001.tiff", "/data/lmu/MYO/MYO_0002.tiff", "/data/lmu/NGS/NGS_0001.tiff",
                    "/data/lmu/LYT/LYT_0001.tiff", "/data/lmu/NGS/NGS_0002.tiff"]
    ann = pd.DataFrame({
        "path": ["MYO/MYO_0001.tiff", "MYO/MYO_0002.tiff", "NGS/NGS_0001.tiff", "LYT/LYT_0001.tiff",
                 "NGS/NGS_0002.tiff", "EOS/EOS_0001.tiff"],
        "gold": ["MYO", "MYO", "NGS", "LYT", "NGS", "EOS"],
        "reannotation1": ["MYO", "MYO", "UNC", "LYT", "NGS", "EOS"],
        "reannotation2": ["nan"] * 6,
    })
    r = metrics.model_vs_examiners(pred, ann)
    assert r["n_matched"] == 5
    e1 = r["examiners"]["reannotation1"]
    assert (e1["n"], e1["n_unc"]) == (5, 1)
    assert e1["kappa"] == pytest.approx(1.0)
    keep = [0, 1, 3, 4]  # the images examiner 1 could assign
    gold = ["MYO", "MYO", "NGS", "LYT", "NGS"]
    called = ["MYO", "MON", "NGS", "LYT", "LYT"]
    assert e1["model_kappa"] == pytest.approx(cohen_kappa_score([gold[i] for i in keep], [called[i] for i in keep]))
    assert e1["model_kappa_all"] == pytest.approx(cohen_kappa_score(gold, called))
    assert r["examiners"]["reannotation2"]["n"] == 0
    none = metrics.model_vs_examiners(pred.assign(path=[f"/pbc/x/{i}.jpg" for i in range(5)]), ann)
    assert none["n_matched"] == 0 and "none of the 5 images" in none["note"] and none["examiners"] == {}


def test_path_key():
    assert metrics.path_key("/a/b/MYO/MYO_0001.tiff") == "MYO/MYO_0001.tiff"
    assert metrics.path_key("MYO\\MYO_0001.tiff") == "MYO/MYO_0001.tiff"
    assert metrics.path_key("x.png") == "x.png"
