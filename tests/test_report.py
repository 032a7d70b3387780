"""make_report on a tiny fake run: every file, the page, the undefined cases, saliency, the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from leukoscope import INTENDED_USE
from leukoscope.cli.main import main
from leukoscope.evaluate.saliency import saliency_map, select_examples
from leukoscope.models import bundle
from leukoscope.models.registry import create_model
from leukoscope.report.build import make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["EBO", "LYT", "MYO", "NGS"]


def strict_json(path):
    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def fake_run(tmp_path, classes=CLASSES, n_per_class=6, folds=2, seed=0, images=False, labels=None,
             root="lmu"):
    """A run folder with a predictions.csv from a noisy classifier (and small images when asked)."""
    rng = np.random.default_rng(seed)
    labels = labels or classes
    rows = []
    for c in labels:
        for i in range(n_per_class):
            rows.append({"path": str(tmp_path / root / c / f"{c}_{i:04d}.png"), "label": c, "fold": i % folds})
    df = pd.DataFrame(rows)
    k = len(classes)
    y = np.array([classes.index(c) if c in classes else 0 for c in df["label"]])
    logits = rng.normal(0, 1, (len(df), k))
    logits[np.arange(len(df)), y] += 1.5
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    df["pred"] = np.array(classes)[prob.argmax(1)]
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = prob[:, j]
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    df.to_csv(run / "predictions.csv", index=False)
    (run / "config.json").write_text(json.dumps({"model": "plain_cnn", "data": str(tmp_path / root),
                                                 "data_fingerprint": "sha256:abc123"}))
    if images:
        for p in df["path"]:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(p)
    return run, df


EXPECTED = {"table1.csv", "confusion.csv", "binary.json", "metrics.json", "confusion.png", "roc_blast.png",
            "roc_atypical.png", "reliability.png", "report.html"}


def test_make_report_writes_every_file(tmp_path):
    run, df = fake_run(tmp_path)
    m = make_report(run, n_boot=100, saliency_per_class=0)
    out = run / "report"
    assert EXPECTED <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for png in ("confusion", "roc_blast", "roc_atypical", "reliability"):
        assert (out / f"{png}.png").read_bytes().startswith(PNG_MAGIC)
    t1 = pd.read_csv(out / "table1.csv")
    assert list(t1.columns[:9]) == ["class", "name", "n_images", "precision_mean", "precision_sd",
                                    "sensitivity_mean", "sensitivity_sd", "specificity_mean", "specificity_sd"]
    assert t1["class"].tolist() == CLASSES and t1["n_images"].tolist() == [6] * 4
    conf = pd.read_csv(out / "confusion.csv")
    assert conf["gold"].tolist() == CLASSES
    np.testing.assert_allclose(conf[CLASSES].sum(axis=1), 1.0)
    js = strict_json(out / "metrics.json")
    assert js["run"]["data_fingerprint"] == "sha256:abc123"
    assert js == json.loads(json.dumps(m))
    b = strict_json(out / "binary.json")
    assert set(b) == {"blast", "atypical"}
    for q in b.values():
        assert {"auc_mean", "auc_sd", "n_pos", "n_neg", "folds"} <= set(q)
    assert b["blast"]["n_pos"] == 6 and len(b["blast"]["folds"]) == 2
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert INTENDED_USE in html and "sha256:abc123" in html
    assert "<script" not in html and "src=\"http" not in html  # self-contained
    assert "saliency" in html.lower() and "no saliency maps requested" in html


def test_undefined_cases_reach_the_page(tmp_path):
    # no blast cells at all, and MYO is a model class with no test image
    run, _ = fake_run(tmp_path, labels=["EBO", "LYT", "NGS"])
    out = tmp_path / "out"
    make_report(run, out, n_boot=50, saliency_per_class=0)
    b = strict_json(out / "binary.json")
    assert "no positive images" in b["blast"]["undefined_reason"] and b["blast"]["auc_mean"] is None
    assert "undefined_reason" not in b["atypical"]
    t1 = pd.read_csv(out / "table1.csv").set_index("class")
    assert t1.loc["MYO", "n_images"] == 0 and math.isnan(t1.loc["MYO", "sensitivity_mean"])
    html = (out / "report.html").read_text()
    assert "not defined: no positive images" in html
    assert "n/a (no test images)" in html
    assert "model classes with no test image" in html


def write_annotations(path, rows):
    path.write_text("".join(" ".join(r) + "\n" for r in rows))
    return path


def test_human_comparison_with_and_without_overlap(tmp_path):
    run, df = fake_run(tmp_path)
    rows = []
    for i, (p, g) in enumerate(zip(df["path"], df["label"])):
        key = "/".join(Path(p).parts[-2:])
        rows.append((key, g, g if i % 3 else "LYT", "nan"))
    rows.append(("EOS/EOS_0001.tiff", "EOS", "EOS", "EOS"))
    ann = write_annotations(tmp_path / "annotations.dat", rows)
    m = make_report(run, tmp_path / "o1", annotations=ann, n_boot=50, saliency_per_class=0)
    mv = m["human"]["model_vs_examiners"]
    assert mv["n_matched"] == len(df)
    assert mv["examiners"]["reannotation1"]["n"] == len(df)
    assert mv["examiners"]["reannotation1"]["model_kappa"] is not None
    html = (tmp_path / "o1" / "report.html").read_text()
    assert "Model κ (same images)" in html and "examiner 1" in html
    b = strict_json(tmp_path / "o1" / "binary.json")
    assert [e["examiner"] for e in b["blast"]["examiners"]] == ["reannotation1", "reannotation2"]

    other = write_annotations(tmp_path / "other.dat", [("MYO/MYO_9999.tiff", "MYO", "MYO", "MOB"),
                                                       ("NGS/NGS_9999.tiff", "NGS", "NGS", "UNC")])
    m = make_report(run, tmp_path / "o2", annotations=other, n_boot=50, saliency_per_class=0)
    assert m["human"]["model_vs_examiners"]["n_matched"] == 0
    html = (tmp_path / "o2" / "report.html").read_text()
    assert f"None of the {len(df)} images in the predictions was re-annotated" in html


def test_bad_run_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="leukoscope cv"):
        make_report(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_cli(tmp_path, capsys):
    run, _ = fake_run(tmp_path)
    assert main(["report", str(run), "--out", str(tmp_path / "r"), "--bootstrap", "50",
                 "--saliency-per-class", "0"]) == 0
    out = capsys.readouterr().out
    assert "macro-F1" in out and "blast: AUC" in out
    assert (tmp_path / "r" / "report.html").exists()


# ------------------------------------------------------------------ saliency

def test_saliency_map_is_abs_gradient_max_over_channels():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(2, 3, 8, 8)
    sal = saliency_map(model, x, [1, 2])
    assert sal.shape == (2, 8, 8) and (sal >= 0).all()
    xr = x.clone().requires_grad_(True)
    model(xr)[torch.arange(2), torch.tensor([1, 2])].sum().backward()
    np.testing.assert_allclose(sal, xr.grad.abs().amax(dim=1).numpy(), rtol=1e-5, atol=1e-7)
    assert model.training  # left in the mode it came in


def test_select_examples_right_and_wrong():
    df = pd.DataFrame({"path": [f"p{i}" for i in range(8)], "fold": 0,
                       "label": ["LYT"] * 4 + ["NGS"] * 4,
                       "pred": ["LYT", "LYT", "NGS", "LYT", "NGS", "NGS", "NGS", "NGS"]})
    s = select_examples(df, 2, seed=0)
    lyt = s[s["label"] == "LYT"]
    assert len(lyt) == 2 and set(lyt["correct"]) == {True, False}
    assert len(s[s["label"] == "NGS"]) == 2 and s[s["label"] == "NGS"]["correct"].all()  # no wrong NGS exist
    assert select_examples(df.sample(frac=1, random_state=1), 2, seed=0)["path"].tolist() == s["path"].tolist()


def tiny_bundle(path, classes):
    kw = {"widths": (4, 8), "hidden": 8, "dropout": 0.0}
    model = create_model("plain_cnn", num_classes=len(classes), input_size=32, **kw)
    meta = bundle.make_meta(classes=classes, model="plain_cnn", input_size=32, mean=(0.5, 0.5, 0.5),
                            std=(0.25, 0.25, 0.25), um_per_px=None, config={"model_kwargs": kw})
    bundle.save_bundle(model, meta, path)


def test_saliency_gallery_from_fold_models(tmp_path):
    run, df = fake_run(tmp_path, images=True, n_per_class=4)
    for fold in (0, 1):
        tiny_bundle(run / f"fold{fold}" / "model.safetensors", CLASSES)
    out = tmp_path / "rep"
    (out / "saliency").mkdir(parents=True)
    (out / "saliency" / "LYT_9_wrong.png").write_bytes(b"stale")  # from an earlier report
    m = make_report(run, out, n_boot=20, saliency_per_class=2)
    ex = m["saliency"]["examples"]
    assert len(ex) == 2 * len(CLASSES)
    files = sorted(p.name for p in (out / "saliency").iterdir())
    assert files == sorted(Path(e["file"]).name for e in ex)
    for e in ex:
        assert (out / e["file"]).read_bytes().startswith(PNG_MAGIC)
        assert e["fold"] == int(df.loc[df["path"] == e["path"], "fold"].item())
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 + len(ex)


def test_saliency_skipped_without_fold_models(tmp_path):
    run, _ = fake_run(tmp_path)
    m = make_report(run, tmp_path / "o", n_boot=20, saliency_per_class=1)
    assert m["saliency"]["examples"] == []
    assert "no fold models" in m["saliency"]["notes"][0]
    assert "saliency maps skipped" in (tmp_path / "o" / "report.html").read_text()


def test_undefined_roc_still_shows_the_examiners_points():
    """No positive images: no curve, but the examiners' calls are still drawn as points."""
    import io

    from matplotlib.colors import to_rgb

    from leukoscope.report.figures import EXAMINER_COLOURS, roc_png

    undefined = {"undefined_reason": "no positive images", "n_pos": 0, "n_neg": 10}
    plain = Image.open(io.BytesIO(roc_png(undefined, "blast")))
    with_points = Image.open(io.BytesIO(roc_png(undefined, "blast", examiners=[
        {"label": "examiner 1", "fpr": 0.09, "tpr": 0.96}, {"label": "examiner 2", "fpr": 0.05, "tpr": 0.91}],
        footnote="other images")))
    # the examiners' colours appear only where their markers are drawn
    def has_colour(im, rgb):
        a = np.asarray(im.convert("RGB")).astype(int)
        return bool((np.abs(a - np.array(rgb)).sum(-1) < 40).any())

    rgb = [int(255 * c) for c in to_rgb(EXAMINER_COLOURS[0])]
    assert has_colour(with_points, rgb) and not has_colour(plain, rgb)
