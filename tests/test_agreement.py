"""Human agreement on the real annotations.dat, and on hand-made cases with known answers."""

import json
import math

import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from leukoscope.cli.main import main
from leukoscope.evaluate.agreement import agreement, agreement_from_annotations, examiner_points


def test_hand_made_agreement():
    df = pd.DataFrame({
        "gold":          ["MYO", "MYO", "NGS", "NGS", "LYT", "MOB", "EBO"],
        "reannotation1": ["MYO", "MON", "NGS", "UNC", "LYT", "MYO", "nan"],
        "reannotation2": ["nan"] * 7,
    })
    r = agreement(df)["reannotation1"]
    assert r["n"] == 6 and r["n_unc"] == 1
    gold = ["MYO", "MYO", "NGS", "LYT", "MOB"]
    called = ["MYO", "MON", "NGS", "LYT", "MYO"]
    assert r["kappa"] == pytest.approx(cohen_kappa_score(gold, called))
    assert r["kappa_unc_as_error"] == pytest.approx(
        cohen_kappa_score(gold[:3] + ["NGS"] + gold[3:], called[:3] + ["UNC"] + called[3:]))
    # blast: positives MYO, MYO, MOB -> called MYO, MON, MYO: 2/3; negatives NGS, LYT -> both negative
    assert r["blast"]["sensitivity"] == pytest.approx(2 / 3)
    assert r["blast"]["specificity"] == 1.0
    assert agreement(df)["reannotation2"]["n"] == 0 and math.isnan(agreement(df)["reannotation2"]["kappa"])
    pts = examiner_points(agreement(df), "blast")
    assert pts[0]["fpr"] == 0.0 and pts[0]["tpr"] == pytest.approx(2 / 3)


def test_real_annotations(lmu_sample, tmp_path):
    res = agreement_from_annotations(lmu_sample / "annotations.dat")
    r1, r2 = res["reannotation1"], res["reannotation2"]
    assert r1["n"] == r2["n"] == 1905
    assert (r1["n_unc"], r2["n_unc"]) == (63, 208)
    # the measured figures (paper: examiners agree closely with the gold standard)
    assert r1["kappa"] == pytest.approx(0.836, abs=1e-3)
    assert r2["kappa"] == pytest.approx(0.868, abs=1e-3)
    assert r1["kappa_unc_as_error"] < r1["kappa"] and r2["kappa_unc_as_error"] < r2["kappa"]
    assert 0.9 < r1["blast"]["sensitivity"] < 1 and 0.9 < r2["blast"]["specificity"] < 1
    out = tmp_path / "a.json"
    assert main(["agreement", str(lmu_sample / "annotations.dat"), "--json", str(out)]) == 0
    js = json.loads(out.read_text())
    assert set(js) == {"reannotation1", "reannotation2"}
    for k in ("n", "n_unc", "kappa", "kappa_unc_as_error", "blast", "atypical"):
        assert k in js["reannotation1"]
    assert set(js["reannotation1"]["blast"]) >= {"sensitivity", "specificity"}
