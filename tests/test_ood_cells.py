"""Per-cell shift warnings: threshold calibration, score and flag, summaries, screen referral and the review banner."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from leukoscope import taxonomy
from leukoscope.models.ood import (OOD_WARN_FRACTION, SHIFT_BANNER, OODWarning, calibrate_threshold,
                                   fallback_threshold, ood_summary, reference_from_features, score_cells,
                                   shift_warning)
from leukoscope.screen.engine import REFER_LOW_CONFIDENCE, REFER_OOD, ImageResult, ScreenEngine
from leukoscope.screen.review import write_review

CLASSES = ("EOS", "LYT", "NGS")


def gen_cells(n, seed, shift=0.0, colour_shift=0.0, d=24):
    """Features of ``n`` cells in three Gaussian classes (``shift`` moves them off), with colour features."""
    rng = np.random.default_rng(seed)
    labels = np.array(CLASSES)[np.arange(n) % 3]
    centres = {c: np.eye(d)[i] * 6 for i, c in enumerate(CLASSES)}
    f = np.stack([centres[c] for c in labels]) + rng.normal(size=(n, d)) + shift
    col = rng.normal([80, 5, 5, 30, 20, -20], 2.0, size=(n, 6)) + colour_shift
    return f, labels, col


def fake_bundle(ref, path="fake.safetensors"):
    return SimpleNamespace(meta={"reference": ref, "classes": list(CLASSES)}, classes=CLASSES, path=path,
                           model=object())


def test_threshold_is_calibrated_out_of_fold_and_held_out_false_alarms_stay_low():
    f, y, col = gen_cells(400, 0)
    thr = calibrate_threshold(f, y, CLASSES, col, quantile=0.99)
    assert thr["quantile"] == 0.99 and thr["n"] == 400 and thr["feature"] > 0 and thr["colour"] > 0
    # either signal beyond its 99th percentile: about 1-2 % of the validation cells
    assert 0.0 < thr["validation_false_alarm_rate"] <= 0.03
    ref = reference_from_features(f, y, CLASSES, col)
    held_f, held_y, held_col = gen_cells(2000, 1)
    s = score_cells(fake_bundle(ref), held_f, held_col)
    assert s.flag.mean() <= 0.05
    np.testing.assert_array_equal(s.flag, s.score > 1.0)
    # a lower quantile flags more of the same cells
    looser = calibrate_threshold(f, y, CLASSES, col, quantile=0.9)
    assert looser["feature"] < thr["feature"] and looser["validation_false_alarm_rate"] > 0.05


def test_score_is_the_worst_signal_over_its_threshold():
    f, y, col = gen_cells(300, 0)
    ref = reference_from_features(f, y, CLASSES, col)
    b = fake_bundle(ref)
    feat_off, _, _ = gen_cells(100, 2, shift=8.0)
    _, _, col_off = gen_cells(100, 3, colour_shift=25.0)
    base_f, _, base_col = gen_cells(100, 4)
    assert score_cells(b, feat_off, base_col).flag.mean() > 0.9       # features alone
    assert score_cells(b, base_f, col_off).flag.mean() > 0.9          # colour alone
    only_features = score_cells(b, base_f, None)
    with_colour = score_cells(b, base_f, base_col)
    assert np.all(with_colour.score >= only_features.score)
    assert score_cells(SimpleNamespace(meta={}, path="x"), base_f) is None


def test_old_bundle_without_threshold_uses_the_fallback_and_says_so_once():
    f, y, col = gen_cells(300, 0)
    ref = reference_from_features(f, y, CLASSES, col)
    del ref["threshold"]
    b = fake_bundle(ref, path="old-bundle-for-test.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s1 = score_cells(b, f[:5], col[:5])
        s2 = score_cells(b, f[:5], col[:5])
    said = [w for w in caught if issubclass(w.category, OODWarning)]
    assert len(said) == 1 and "fallback" in str(said[0].message)
    assert s1.threshold["fallback"] and s1.threshold["feature"] == pytest.approx(1.25 * ref["distance_quantiles"]["q99"])
    assert s1.threshold == s2.threshold == fallback_threshold(ref)


def test_summary_warns_above_the_stated_fraction_or_median():
    thr = {"quantile": 0.99, "feature": 1.0, "colour": 2.0, "validation_false_alarm_rate": 0.01}
    n = 50
    k = int(OOD_WARN_FRACTION * n)  # exactly 20 %: not above it
    calm = ood_summary([True] * k + [False] * (n - k), [2.0] * k + [0.5] * (n - k), thr)
    assert calm["warning"] is None and calm["flagged"] == k and calm["total"] == n and calm["fraction"] == 0.2
    loud = ood_summary([True] * (k + 1) + [False] * (n - k - 1), [2.0] * (k + 1) + [0.5] * (n - k - 1), thr)
    assert loud["warning"] == shift_warning(k + 1, n) == f"{k + 1} of {n} cells look unlike the training data; " \
                                                         "calls are unreliable"
    assert loud["threshold"]["quantile"] == 0.99 and loud["threshold"]["validation_false_alarm_rate"] == 0.01
    empty = ood_summary([], [], thr)
    assert empty["total"] == 0 and empty["warning"] is None and empty["fraction"] is None


class _OODScriptedBundle:
    """A bundle double with a reference: confidences and OOD scores scripted per cell."""

    def __init__(self, ref, conf, scores):
        self.meta = {"classes": list(taxonomy.CLASSES), "input_size": 32, "um_per_px": 29.0 / 32,
                     "temperature": 1.0, "model": "scripted", "reference": ref}
        self.classes = taxonomy.CLASSES
        self.model = object()
        self.path = "scripted.safetensors"
        self.conf, self.scores = conf, scores


def _detections(n):
    return pd.DataFrame({"x0": np.arange(n) * 40, "y0": 10, "x1": np.arange(n) * 40 + 30, "y1": 40,
                         "cx": np.arange(n) * 40 + 15.0, "cy": 25.0, "nucleus_um2": 30.0, "cell_um2": 90.0,
                         "tile": 0})


def _result(engine, conf, scores, image="field.png"):
    det = _detections(len(conf))
    k = taxonomy.class_index("NGS")
    for j, c in enumerate(engine.classes):
        det[f"prob_{c}"] = [p if j == k else (1 - p) / (len(engine.classes) - 1) for p in conf]
    det["ood_score"] = scores
    det.insert(0, "image", image)
    return ImageResult(image=image, status="ok", width=400, height=100, um_per_px=0.1, cells=det)


def test_screen_refers_ood_cells_and_sums_them_up_per_field_and_run(tmp_path):
    f, y, col = gen_cells(300, 0)
    ref = reference_from_features(f, y, CLASSES, col)
    engine = ScreenEngine(_OODScriptedBundle(ref, None, None), refer_below=0.5, progress=False)
    # field a: 4 cells, one low-confidence, one OOD, one both; field b: in distribution
    a = _result(engine, [0.9, 0.3, 0.95, 0.2], [0.5, 0.4, 3.0, 2.0], "a.png")
    b = _result(engine, [0.9] * 6, [0.3] * 6, "b.png")
    res = engine.assemble([a, b])
    c = res.cells.set_index(["image", "x0"])
    assert list(c.loc["a.png", "refer_reason"]) == ["", REFER_LOW_CONFIDENCE, REFER_OOD,
                                                    f"{REFER_LOW_CONFIDENCE};{REFER_OOD}"]
    assert list(c.loc["a.png", "referred"]) == [False, True, True, True]
    assert list(c.loc["a.png", "ood_flag"]) == [False, False, True, True]
    assert (c.loc["a.png", "pred"] == "unidentified").sum() == 3
    per = {im["image"]: im for im in res.summary["images"]}
    assert per["a.png"]["ood"]["flagged"] == 2 and per["a.png"]["ood"]["total"] == 4
    assert per["a.png"]["ood"]["warning"] == shift_warning(2, 4) and shift_warning(2, 4) in per["a.png"]["warnings"]
    assert per["b.png"]["ood"]["warning"] is None and per["b.png"]["unidentified"] == 0
    run = res.summary["ood"]
    assert run == res.summary["overall"]["ood"]
    assert (run["flagged"], run["total"], run["fraction"]) == (2, 10, 0.2) and run["warning"] is None
    assert run["threshold"]["quantile"] == ref["threshold"]["quantile"]
    html = write_review(res, tmp_path / "calm.html").read_text()
    assert SHIFT_BANNER not in html
    # a shifted run: the warning in summary.json and the banner on the review page
    shifted = engine.assemble([_result(engine, [0.9] * 5, [1.5, 2.0, 0.4, 3.0, 1.2], "c.png")])
    assert shifted.summary["ood"]["warning"] == shift_warning(4, 5)
    paths = shifted.write(tmp_path / "out", bundle=None)
    assert json.loads(paths["summary"].read_text())["ood"]["flagged"] == 4
    written = pd.read_csv(paths["cells"])
    assert {"ood_score", "ood_flag", "refer_reason"} <= set(written.columns) and written["ood_flag"].sum() == 4
    html = paths["review"].read_text()
    assert SHIFT_BANNER in html and "4 of 5 cells" in html


def test_screen_without_a_reference_has_empty_ood_columns_and_a_note():
    bundle = SimpleNamespace(meta={"classes": list(taxonomy.CLASSES), "input_size": 32, "um_per_px": 29.0 / 32,
                                   "temperature": 1.0, "model": "scripted"}, classes=taxonomy.CLASSES)
    engine = ScreenEngine(bundle, refer_below=0.5, progress=False)
    r = _result(engine, [0.9, 0.3], [np.nan, np.nan])
    res = engine.assemble([r])
    assert res.cells["ood_score"].isna().all() and res.cells["ood_flag"].isna().all()
    assert list(res.cells["refer_reason"]) == ["", REFER_LOW_CONFIDENCE]
    assert "no out-of-distribution reference" in res.summary["ood"]["note"] and res.summary["ood"]["warning"] is None


def _tiny_bundle(path):
    import torch

    from leukoscope.models.bundle import make_meta, save_bundle
    from leukoscope.models.registry import create_model

    torch.manual_seed(0)
    kw = {"widths": [8, 16], "hidden": 16, "dropout": 0.0}
    model = create_model("plain_cnn", num_classes=4, **kw).eval()
    meta = make_meta(classes=("LYT", "MOB", "MYO", "NGS"), model="plain_cnn", input_size=32, mean=(0.5,) * 3,
                     std=(0.25,) * 3, um_per_px=None, temperature=1.0, config={"model_kwargs": kw})
    return save_bundle(model, meta, path)


def test_predict_scores_each_image_and_warns_on_a_shifted_folder(cells, tmp_path, capsys):
    from PIL import Image

    from leukoscope.cli.main import main
    from leukoscope.imaging.images import load_rgb
    from leukoscope.models.bundle import load_bundle
    from leukoscope.models.ood import COLOUR_ON_INPUT, colour_basis, fit_reference, store_reference
    from leukoscope.predict import NO_REFERENCE_NOTE, OOD_COLUMNS, predict_paths

    path = _tiny_bundle(tmp_path / "model.safetensors")
    table = cells.table
    plain = predict_paths(load_bundle(path), [str(p) for p in table["path"]])
    assert not set(OOD_COLUMNS) & set(plain.table.columns) and plain.ood["note"] == NO_REFERENCE_NOTE
    ref = fit_reference(load_bundle(path), table, stain=False)
    assert colour_basis(ref) == COLOUR_ON_INPUT and ref["threshold"]["n"] == len(table)
    store_reference(path, ref)
    b = load_bundle(path)
    same = predict_paths(b, [str(p) for p in table["path"]])
    assert list(same.table.columns[-2:]) == OOD_COLUMNS
    assert same.ood["total"] == len(table) and same.ood["warning"] is None
    np.testing.assert_allclose(same.table[[c for c in same.table if c.startswith("prob_")]].to_numpy(),
                               plain.table[[c for c in plain.table if c.startswith("prob_")]].to_numpy(), atol=1e-6)
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for i, p in enumerate(table["path"]):  # green and blue swapped: a stain no training cell had
        Image.fromarray(load_rgb(p)[..., [0, 2, 1]]).save(shifted / f"c{i}.png")
    out = tmp_path / "shifted.csv"
    assert main(["predict", str(path), str(shifted), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    df = pd.read_csv(out)
    assert df["ood_flag"].mean() > OOD_WARN_FRACTION
    assert f"{int(df['ood_flag'].sum())} of {len(df)} cells look unlike the training data; calls are unreliable" in err


def test_review_station_shows_the_shift_banner_and_refers_flagged_predict_images(tmp_path, cells):
    from fastapi.testclient import TestClient
    from PIL import Image

    from leukoscope.review import ReviewStore
    from leukoscope.review.app import create_app

    f, y, col = gen_cells(300, 0)
    engine = ScreenEngine(_OODScriptedBundle(reference_from_features(f, y, CLASSES, col), None, None),
                          refer_below=0.5, progress=False)
    field = tmp_path / "c.png"
    Image.fromarray(np.full((100, 400, 3), 220, np.uint8)).save(field)
    res = engine.assemble([_result(engine, [0.9] * 5, [1.5, 2.0, 0.4, 3.0, 1.2], str(field))])
    out = tmp_path / "screen"
    res.write(out, review=False)
    with ReviewStore.open_or_create(out) as store:
        assert store.run["ood"]["flagged"] == 4 and store.run["ood"]["warning"] == shift_warning(4, 5)
        html = TestClient(create_app(store), base_url="http://127.0.0.1:8765").get("/").text
    assert SHIFT_BANNER in html and "4 of 5 cells" in html
    # a predict table: an image flagged by ood_flag is referred even when confident
    table = cells.table.head(3)
    pred = pd.DataFrame({"path": table["path"].astype(str), "pred": "NGS", "p_blast": 0.0, "p_atypical": 0.0,
                         "prob_NGS": 0.9, "prob_LYT": 0.1, "ood_score": [0.5, 2.0, 0.7],
                         "ood_flag": [False, True, False]})
    pred.to_csv(tmp_path / "pred.csv", index=False)
    with ReviewStore.open_or_create(tmp_path / "pred.csv") as store:
        assert [c["model_call"] for c in store.cells()].count("unidentified") == 1
        assert store.run["ood"]["flagged"] == 1 and store.run["ood"]["warning"] is not None  # 1 of 3 > 20 %
