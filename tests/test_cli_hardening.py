"""Issue 17 items 7, 9, 11: messages instead of tracebacks, the partial-result exit policy, one
progress option, --device, help texts, 6-digit probabilities, a truncated predictions.csv refused."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from leukoscope import progress as progress_mod
from leukoscope.cli import main as main_mod
from leukoscope.cli._common import EXIT_FAILED, EXIT_IO, EXIT_USAGE
from leukoscope.cli.main import build_parser, main
from leukoscope.data.readers import read_label_map
from leukoscope.evaluate.predictions import FLOAT_FORMAT, predictions_table, write_table
from leukoscope.models.bundle import make_meta, save_bundle
from leukoscope.models.registry import create_model, get_config
from leukoscope.report.build import make_report

from conftest import SYNTH_CLASSES

REPO = Path(__file__).resolve().parents[1]
MODEL_COMMANDS = ("screen", "evaluate", "report", "adapt", "cv", "predict", "train")


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    yield prefix, parser
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sub in act.choices.items():
                yield from _subparsers(sub, prefix + (name,))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An untrained tiny bundle of the shared synthetic classes (fast; the calls do not matter here)."""
    torch.manual_seed(0)
    cfg = get_config("plain_cnn", input_size=32)
    model = create_model("plain_cnn", num_classes=len(SYNTH_CLASSES), input_size=32)
    meta = make_meta(classes=SYNTH_CLASSES, model="plain_cnn", input_size=32, mean=cfg.mean, std=cfg.std,
                     um_per_px=cfg.um_per_px, temperature=1.0)
    return save_bundle(model, meta, tmp_path_factory.mktemp("bundle") / "model.safetensors")


# ---------------------------------------------------------------- item 11: the parser itself

def test_every_option_of_every_command_has_help():
    missing = []
    for names, p in _subparsers(build_parser()):
        for act in p._actions:
            if isinstance(act, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (act.help or "").strip():
                missing.append(f"leukoscope {' '.join(names)}: {act.option_strings or act.dest}")
    assert not missing, "options without help text: " + "; ".join(missing)


def test_device_and_progress_on_every_command_that_runs_a_model():
    subs = {names: p for names, p in _subparsers(build_parser())}
    for cmd in MODEL_COMMANDS:
        opts = {o for a in subs[(cmd,)]._actions for o in a.option_strings}
        assert {"--device", "--progress", "--no-progress", "--quiet"} <= opts, cmd
    opts = {o for a in subs[("data", "summary")]._actions for o in a.option_strings}
    assert "--progress" in opts


@pytest.mark.parametrize("alias", ["--no-progress", "--quiet"])
@pytest.mark.parametrize("cmd", ["train", "predict", "screen", "demo"])
def test_deprecated_progress_aliases_still_work_everywhere(cmd, alias):
    argv = {"train": ["train", "d", "--out", "o"], "predict": ["predict", "m", "x", "--out", "o"],
            "screen": ["screen", "m", "x", "--out", "o"], "demo": ["demo"]}[cmd]
    args = main_mod.parse_args(build_parser(), argv + [alias])
    assert args.progress == "none"
    assert main_mod.parse_args(build_parser(), argv + ["--progress", "plain"]).progress == "plain"


def test_a_bad_option_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "m.safetensors", "x.png", "--out", "p.csv", "--no-such-option"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: leukoscope predict") and "unrecognized arguments: --no-such-option" in err
    with pytest.raises(SystemExit):
        main(["data", "summary", "d", "--bogus"])
    assert capsys.readouterr().err.startswith("usage: leukoscope data summary")


@pytest.mark.parametrize("argv", [
    ["predict", "m", "x", "--out", "o.csv", "--batch-size", "0"],
    ["predict", "m", "x", "--out", "o.csv", "--batch-size", "-1"],
    ["train", "d", "--out", "r", "--batch-size", "0"],
    ["cv", "d", "--out", "r", "--folds", "0"],
    ["screen", "m", "x", "--out", "o", "--tile-size", "0"],
])
def test_non_positive_counts_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "must be 1 or more" in err and "Traceback" not in err


# ---------------------------------------------------------------- item 7: messages, not tracebacks

@pytest.mark.parametrize("exc, words, code", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/out.csv"), "/x/out.csv: permission denied", EXIT_IO),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/dir"), "/x/dir: is a folder, not a file", EXIT_IO),
    (FileExistsError(errno.EEXIST, "File exists", "/x/f"), "/x/f: already exists", EXIT_IO),
    (OSError(errno.ENOSPC, "No space left on device", "/x/big.csv"), "/x/big.csv: no space left on the device",
     EXIT_IO),
    (OSError(errno.EFBIG, "File too large", "/x/big.csv"), "/x/big.csv: file too large for the file system",
     EXIT_IO),
    (TypeError("boom"), "internal error: TypeError: boom", 70),
])
def test_os_errors_become_one_line_messages_naming_the_file(monkeypatch, capsys, tmp_path, exc, words, code):
    import leukoscope.cli.split as split_cmd

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(split_cmd, "read_dataset", fail)
    assert main(["split", str(tmp_path), "--out", str(tmp_path / "s.csv")]) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(type(exc)):  # --debug shows the real exception
        main(["--debug", "split", str(tmp_path), "--out", str(tmp_path / "s.csv")])


def test_out_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import leukoscope.cli.predict as predict_cmd

    monkeypatch.setattr(predict_cmd, "load_bundle", lambda *a, **k: pytest.fail("the model was loaded first"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "folder"
    a_dir.mkdir()
    assert main(["predict", "m", "x.png", "--out", str(a_dir)]) == EXIT_USAGE
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["predict", "m", "x.png", "--out", str(a_file / "p.csv")]) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["screen", "m", "x.png", "--out", str(a_file)]) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["evaluate", "m", "d", "--out", str(a_file)]) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["predict", "m", "x.png", "--out", str(ro / "p.csv")]) == EXIT_USAGE
        assert "cannot write in" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_label_map_of_the_wrong_shape(tmp_path, capsys):
    lm = tmp_path / "map.json"
    lm.write_text(json.dumps([["neutrophil", "NGS"]]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_label_map(lm)
    assert main(["data", "summary", str(tmp_path), "--label-map", str(lm)]) == EXIT_USAGE
    assert "map.json: expected a JSON object" in capsys.readouterr().err
    lm.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_label_map(lm)


def test_agreement_on_a_folder_names_the_file_to_give(tmp_path, capsys):
    (tmp_path / "annotations.dat").write_text("a.tiff NGS nan nan\n")
    assert main(["agreement", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is a folder" in err and "did you mean" in err and "annotations.dat" in err


def test_export_opset_range_is_stated(tmp_path, capsys):
    assert main(["export", "m", "--onnx", str(tmp_path / "m.onnx"), "--opset", "1"]) == EXIT_USAGE
    assert "opset 1 is not supported: give an opset from 13 to 20" in capsys.readouterr().err


# ---------------------------------------------------------------- item 9 and 11: predict

def test_predict_on_an_empty_folder_is_an_error_and_writes_nothing(bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle), str(empty), "--out", str(out)]) == EXIT_USAGE
    assert "no image files in" in capsys.readouterr().err and not out.exists()


def test_predict_partial_policy_and_strict(bundle, cells_root, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = sorted((cells_root / SYNTH_CLASSES[0]).glob("*.tif*"))[:2]
    out = tmp_path / "p.csv"
    argv = ["predict", str(bundle), *map(str, good), str(bad), "--out", str(out), "--progress", "none"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "1 of 3 inputs failed; see" in err and "p.errors.csv" in err
    errors = pd.read_csv(tmp_path / "p.errors.csv")
    assert errors["path"].tolist() == [str(bad)]
    text = out.read_text()
    assert len(pd.read_csv(out)) == 2
    # probabilities with 6 significant digits at most
    digits = [len(v.lstrip("-").replace(".", "").split("e")[0].lstrip("0")) for v in text.splitlines()[1].split(",")[2:]]
    assert max(digits) <= 6
    out.unlink()
    assert main(argv + ["--strict"]) == EXIT_FAILED
    assert "--strict" in capsys.readouterr().err and not out.exists()
    # every image fine: no errors file left from before
    assert main(["predict", str(bundle), *map(str, good), "--out", str(out), "--progress", "none"]) == 0
    assert not (tmp_path / "p.errors.csv").exists()


def test_predict_given_a_cv_run_folder_names_a_file(bundle, tmp_path, capsys):
    run = tmp_path / "cvrun"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "model.safetensors").write_bytes(Path(bundle).read_bytes())
    assert main(["predict", str(run), "x.png", "--out", str(tmp_path / "p.csv")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cross-validation run" in err and str(run / "fold0" / "model.safetensors") in err
    assert "leukoscope train DATA --out RUN" in err


def test_one_float_format_six_significant_digits(tmp_path):
    t = predictions_table(["a.png"], np.array([[1 / 3, 2 / 3]]), ["LYT", "MYB"])
    path = write_table(t, tmp_path / "p.csv")
    assert FLOAT_FORMAT == "%.6g"
    assert "0.333333,0.666667" in path.read_text()


# ---------------------------------------------------------------- item 9: report on a truncated file

def _fake_run(run: Path, n: int = 12) -> pd.DataFrame:
    classes = ["LYT", "MYO"]
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1], n)
    labels = [classes[i % 2] for i in range(n)]
    paths = [f"{c}/{c}_{i:04d}.tiff" for i, c in enumerate(labels)]
    df = predictions_table(paths, p, classes, label=labels, fold=[i % 2 for i in range(n)])
    df = df[["path", "label", "fold", "pred", "prob_LYT", "prob_MYO"]]
    run.mkdir(parents=True, exist_ok=True)
    write_table(df, run / "predictions.csv")
    (run / "cv_summary.json").write_text(json.dumps({"n": n}))
    df[["path", "label", "fold"]].to_csv(run / "split.csv", index=False)
    return df


def test_report_refuses_a_predictions_file_cut_at_a_line_boundary(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    make_report(run, tmp_path / "rep_ok", saliency_per_class=0, n_boot=0)  # the whole file: fine
    lines = (run / "predictions.csv").read_text().splitlines(keepends=True)
    (run / "predictions.csv").write_text("".join(lines[:7]))
    with pytest.raises(ValueError, match="has 6 rows but the run predicted 12 images"):
        make_report(run, tmp_path / "rep", saliency_per_class=0, n_boot=0)
    assert main(["report", str(run), "--bootstrap", "0", "--saliency-per-class", "0"]) == EXIT_USAGE


def test_report_refuses_predictions_not_in_the_split(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    (run / "cv_summary.json").unlink()
    split = pd.read_csv(run / "split.csv")
    split.iloc[:6].to_csv(run / "split.csv", index=False)
    with pytest.raises(ValueError, match="does not match"):
        make_report(run, tmp_path / "rep", saliency_per_class=0, n_boot=0)


def test_report_banner_is_on_the_first_screen(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    make_report(run, tmp_path / "rep", saliency_per_class=0, n_boot=0, banner="These data are SYNTHETIC")
    html = (tmp_path / "rep" / "report.html").read_text()
    body = html[html.index("<body"):]
    assert "These data are SYNTHETIC" in body[:body.index("<nav>")]


# ---------------------------------------------------------------- item 11: progress

def test_plain_progress_writes_whole_lines_and_no_carriage_return(monkeypatch):
    buf = io.StringIO()
    progress_mod.set_mode("plain")
    try:
        monkeypatch.setattr(progress_mod, "PLAIN_SECONDS", 1e9)
        bar = progress_mod.tqdm(total=100, desc="work", file=buf, mininterval=0)
        for _ in range(100):
            bar.update(1)
        bar.close()
        progress_mod.set_mode("none")
        quiet = io.StringIO()
        for _ in progress_mod.tqdm(range(5), file=quiet):
            pass
    finally:
        progress_mod.set_mode("auto")
    text = buf.getvalue()
    assert "\r" not in text and "work" in text
    assert 9 <= len(text.splitlines()) <= 11  # one line per 10 %
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError):
        progress_mod.set_mode("loud")


def test_auto_progress_is_plain_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    progress_mod.set_mode("auto")
    assert progress_mod.get_mode() == "plain"


def test_a_two_epoch_toy_train_logged_to_a_file_has_no_carriage_returns(cells_root, tmp_path):
    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LEUKOSCOPE_NO_TCMALLOC": "1"}
    env.pop("LEUKOSCOPE_PROGRESS", None)
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "leukoscope", "train", str(cells_root), "--preset", "fast",
                              "--model", "plain_cnn", "--input-size", "32", "--epochs", "2", "--per-class", "4",
                              "--batch-size", "4", "--workers", "1", "--out", str(tmp_path / "run")],
                             stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert "\r" not in text
    assert "epoch 1/2" in text  # progress is there, as plain lines


def test_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    """ENOSPC raised inside a write (no file name on the error) still names the output file."""
    from leukoscope import io as io_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(OSError) as exc:
        io_mod.atomic_write_csv(pd.DataFrame({"a": [1]}), tmp_path / "x.csv")
    assert exc.value.filename == str(tmp_path / "x.csv") and exc.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_an_os_error_without_errno_is_an_input_error(monkeypatch, capsys, tmp_path):
    """PIL's 'cannot identify image file' is an OSError without errno: a bad input (2), not the file system (4)."""
    import leukoscope.cli.split as split_cmd

    def fail(*a, **k):
        raise OSError(f"cannot identify image file '{tmp_path / 'x.tif'}'")

    monkeypatch.setattr(split_cmd, "read_dataset", fail)
    assert main(["split", str(tmp_path), "--out", str(tmp_path / "s.csv")]) == EXIT_USAGE
    assert "cannot identify image file" in capsys.readouterr().err
