"""Prediction CSVs and the train / cv / predict / export commands end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leukoscope.cli.main import main

from conftest import SYNTH_CLASSES, SYNTH_PER_CLASS

TINY_ARGS = ["--preset", "fast", "--model", "plain_cnn", "--input-size", "32", "--epochs", "1", "--per-class", "4", "--batch-size", "8",
             "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def cells(cells_root):
    """This module passes folders to the CLI: the shared synthetic dataset's folder (conftest, 4 classes x 6)."""
    return cells_root


@pytest.fixture(scope="module")
def run_dir(cells, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(cells), *TINY_ARGS, "--out", str(out)]) == 0
    return out


def test_train_without_a_preset_trains_the_robust_one(cells, tmp_path):
    """The default preset is robust: estimated scale and white balance recorded in the bundle, which
    predict then applies (scale estimated for the input by default)."""
    import json

    args = [a for a in TINY_ARGS if a not in ("--preset", "fast")]
    assert main(["train", str(cells), *args, "--out", str(tmp_path / "r")]) == 0
    meta = json.loads((tmp_path / "r" / "metadata.json").read_text())
    assert meta["config"]["preset"] == "robust" and meta["white_balance"] is True
    assert meta["training_scale"]["scale"] == "estimate" and meta["config"]["stain_jitter"] == 0.1


def test_train_command_writes_the_run(run_dir):
    for name in ("model.safetensors", "config.json", "log.csv", "metadata.json"):
        assert (run_dir / name).exists()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"] == "plain_cnn" and cfg["input_size"] == 32 and cfg["epochs"] == 1 and cfg["per_class"] == 4


def test_predict_csv_columns_blast_score_and_bad_images_skipped(run_dir, cells, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir / "model.safetensors"), str(cells / "MYO"), str(bad),
                 str(tmp_path / "gone.png"), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "broken.png" in printed and "gone.png" in printed
    df = pd.read_csv(out)
    assert df.columns.tolist() == ["path", "pred", "p_blast", "p_atypical", "prob_LYT", "prob_MOB", "prob_MYO",
                                   "prob_NGS"]
    assert len(df) == SYNTH_PER_CLASS  # every MYO image, none of the bad ones
    assert np.allclose(df["p_blast"], df["prob_MYO"] + df["prob_MOB"])
    assert np.allclose(df["p_atypical"], df["prob_MYO"] + df["prob_MOB"])  # LYT and NGS are not atypical
    assert np.allclose(df.filter(like="prob_").sum(axis=1), 1)


def test_predict_paths_matches_bundle_predict_proba(run_dir, cells):
    from leukoscope.models import load_bundle
    from leukoscope.predict import predict_paths

    b = load_bundle(run_dir)
    res = predict_paths(b, [cells / "LYT"], um_per_px=0.0725)
    want = b.predict_proba(res.table["path"].tolist(), um_per_px=0.0725)
    assert np.allclose(res.table.filter(like="prob_").to_numpy(), want)
    assert res.errors == []


def test_predict_paths_takes_a_path_string_as_one_path_and_scans_nothing_else(run_dir, cells, monkeypatch):
    from leukoscope.models import load_bundle
    from leukoscope.predict import predict_paths

    one = sorted(cells.rglob("*.tiff"))[0]
    scanned = []
    real_rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: scanned.append(self) or real_rglob(self, pattern))
    monkeypatch.chdir(one.parent)
    b = load_bundle(run_dir)
    for given in (str(one), one):
        res = predict_paths(b, given)
        assert res.table["path"].tolist() == [str(one)] and res.errors == []
    assert scanned == []  # neither / nor the working folder (nor anything) was searched
    assert len(predict_paths(b, str(cells / "LYT")).table) == SYNTH_PER_CLASS
    assert scanned == [cells / "LYT"]


def test_cv_command_writes_predictions_once_per_image(cells, tmp_path):
    out = tmp_path / "cv"
    assert main(["cv", str(cells), "--folds", "2", *TINY_ARGS, "--out", str(out)]) == 0
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == len(SYNTH_CLASSES) * SYNTH_PER_CLASS and preds["path"].is_unique and set(preds["fold"]) == {0, 1}
    assert (out / "split.csv").exists() and (out / "config.json").exists()


def test_train_on_a_split_fold(cells, tmp_path):
    split = tmp_path / "split.csv"
    assert main(["split", str(cells), "--folds", "5", "--out", str(split)]) == 0
    out = tmp_path / "f0"
    assert main(["train", str(cells), *TINY_ARGS, "--split", str(split), "--fold", "0", "--out", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    held_out = (pd.read_csv(split)["fold"] == 0).sum()
    assert 0 < held_out < len(SYNTH_CLASSES) * SYNTH_PER_CLASS
    assert meta["metrics"]["n_train"] + meta["metrics"]["n_val"] == len(SYNTH_CLASSES) * SYNTH_PER_CLASS - held_out


def test_export_command(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir / "model.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").exists() and "same predictions" in capsys.readouterr().out


def test_clear_errors(cells, tmp_path, capsys):
    assert main(["train", str(cells), "--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "known models" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    assert main(["predict", str(junk), str(cells), "--out", str(tmp_path / "p.csv")]) == 2
    assert "junk.safetensors is not a LeukoScope model bundle" in capsys.readouterr().err
    assert main(["train", "--list-models"]) == 0
    assert "resnext50_32x4d" in capsys.readouterr().out


def test_predict_estimates_the_scale_from_red_cells(run_dir, tmp_path, capsys):
    """'estimate' (and, for a model trained on estimated scales, the default) measures µm/px per input folder."""
    from PIL import Image

    from leukoscope.models import load_bundle, save_bundle
    from leukoscope.predict import predict_paths
    from leukoscope.synth import make_cell

    um = 0.1  # 29 µm fields drawn at 290 px
    folder = tmp_path / "other_lab"
    folder.mkdir()
    for i, c in enumerate(["LYT", "MOB", "MYO", "NGS"] * 2):
        Image.fromarray(make_cell(c, seed=i, size=290)).save(folder / f"c{i}.png")
    b = load_bundle(run_dir)
    plain = predict_paths(b, [folder])
    assert plain.scale["origin"].startswith("none")
    est = predict_paths(b, [folder], um_per_px="estimate")
    (rec,) = est.scale["estimates"].values()
    assert rec["plausible"] and rec["um_per_px"] == pytest.approx(um, rel=0.15)
    # the estimate changes what the model sees (resampled to its scale instead of resized)
    assert not np.allclose(plain.table.filter(like="prob_").to_numpy(), est.table.filter(like="prob_").to_numpy())
    given = predict_paths(b, [folder], um_per_px=rec["um_per_px"])
    assert np.allclose(given.table.filter(like="prob_").to_numpy(), est.table.filter(like="prob_").to_numpy())
    # a bundle trained with --scale estimate estimates by default
    trained_est = save_bundle(b.model, {**b.meta, "training_scale": {"scale": "estimate"}}, tmp_path / "m.safetensors")
    auto = predict_paths(load_bundle(trained_est), [folder])
    assert auto.scale["origin"].startswith("estimated")
    assert main(["predict", str(trained_est), str(folder), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    assert "µm/px from" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["predict", str(trained_est), str(folder), "--out", str(tmp_path / "q.csv"), "--um-per-px", "big"])
