"""Training and inference guards (issue 17 items 1, 3, 7 part, 8): a diverging run stops with a clear
error, NaN weights are neither written nor loaded, a non-finite probability is never a call, the
run folder is locked and remembers its data and config, corrupt checkpoints are named, and
out-of-range settings are refused before any work."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from leukoscope.cli.main import main
from leukoscope.evaluate.external import evaluate_sets
from leukoscope.imaging.images import MAX_FIELD_PIXELS, ImageError, load_rgb
from leukoscope.io import FolderLockedError, folder_lock
from leukoscope.models.bundle import META_KEY, NotABundleError, load_bundle, save_bundle
from leukoscope.models.inference import NONFINITE_REASON
from leukoscope.predict import predict_paths
from leukoscope.report.build import make_report
from leukoscope.screen.engine import ScreenEngine
from leukoscope.synth import make_smear
from leukoscope.train import TrainConfig, cross_validate, train
from leukoscope.train.adapt import adapt
from leukoscope.train.checkpoint import CorruptCheckpointError, RunMismatchError, load_checkpoint
from leukoscope.train.trainer import TrainingDivergedError

from conftest import tiny_config
from test_screen import ScriptedBundle


def quiet(_):
    pass


def tiny(**kw) -> TrainConfig:
    return tiny_config(**{"epochs": 2, "ood_reference": False, **kw})


@pytest.fixture(scope="module")
def run(cells, tmp_path_factory):
    """One finished tiny run (shared: tests copy what they change)."""
    out = tmp_path_factory.mktemp("guards") / "run"
    return train(cells.table, out, tiny(), progress=False, log=quiet)


# --------------------------------------------------------------------------- 1. non-finite values


def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_model(cells, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match=r"training diverged: .*not finite|training diverged: .*nan"):
        train(cells.table, out, tiny(lr=1e12), progress=False, log=quiet)
    assert not (out / "model.safetensors").exists()
    if (out / "checkpoint.pt").exists():  # every checkpoint kept holds finite weights only
        ck = load_checkpoint(out / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_cli_train_with_an_absurd_learning_rate_exits_non_zero(cells_root, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", str(cells_root), "--model", "plain_cnn", "--input-size", "32", "--epochs", "1",
               "--per-class", "4", "--batch-size", "8", "--lr", "1e12", "--threads", "1", "--workers", "1",
               "--no-ood-reference", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "diverged" in err and "--restart" in err
    assert not (out / "model.safetensors").exists()


def test_nan_weights_are_neither_saved_nor_loaded(run, tmp_path):
    b = load_bundle(run.bundle_path)
    with torch.no_grad():
        w = next(p for p in b.model.parameters() if p.is_floating_point())
        w[(0,) * w.ndim] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_bundle(b.model, b.meta, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    # a file written by other means: refused on loading, naming the file
    state = {k: v.detach().contiguous() for k, v in b.model.state_dict().items()}
    bad = tmp_path / "broken.safetensors"
    save_file(state, str(bad), metadata={META_KEY: json.dumps(b.meta)})
    with pytest.raises(NotABundleError, match=r"broken\.safetensors.*NaN or infinite"):
        load_bundle(bad)


def _nan_for_first_row(bundle):
    """Make the model answer NaN for the first image of every batch (the others unchanged)."""
    bundle.backend = "torch"  # hooks act on PyTorch's forward only
    bundle.meta["inference_bf16"] = False  # no fp32 re-run of near-ties (it would NaN another first row)

    def hook(module, inputs, output):
        output = output.clone()
        output[0] = float("nan")
        return output

    bundle.model.register_forward_hook(hook)
    return bundle


def test_predict_turns_a_nan_probability_into_an_error_for_that_image(run, cells):
    paths = [str(p) for p in cells.table["path"][:3]]
    b = _nan_for_first_row(load_bundle(run.bundle_path))
    res = predict_paths(b, paths, batch_size=64)
    assert [e["path"] for e in res.errors] == [paths[0]]
    assert res.errors[0]["reason"] == NONFINITE_REASON
    assert res.table["path"].astype(str).tolist() == paths[1:]
    probs = res.table[[c for c in res.table if c.startswith("prob_")]].to_numpy(dtype=float)
    assert np.isfinite(probs).all()


def test_evaluate_turns_a_nan_probability_into_an_error_for_that_image(run, cells):
    table = cells.table.iloc[:4].reset_index(drop=True)
    b = _nan_for_first_row(load_bundle(run.bundle_path))
    res = evaluate_sets(b, table, n_boot=0)
    assert [e["path"] for e in res.errors if e["reason"] == NONFINITE_REASON] == [str(table["path"][0])]
    assert str(table["path"][0]) not in set(res.predictions["path"].astype(str))
    assert len(res.predictions) == 3


def test_screen_refers_cells_with_nan_probabilities_and_counts_them(tmp_path):
    img, _ = make_smear(1000, 700, n_leukocytes=6, seed=3, um_per_px=0.1)
    bundle = ScriptedBundle([0.95, float("nan")])  # every second cell: NaN probabilities
    res = ScreenEngine(bundle, refer_below=0.5, um_per_px=0.1, progress=False).screen([img], names=["field"])
    cells = res.cells
    bad = cells["confidence"].isna()
    assert bad.sum() == len(cells) // 2 > 0
    assert cells.loc[bad, "referred"].all() and (cells.loc[bad, "pred"] == "unidentified").all()
    assert (cells.loc[bad, "model_pred"] == "unidentified").all()  # no class was called for them
    ov = res.summary["overall"]
    assert ov["cells_nonfinite"] == bad.sum()
    assert ov["unidentified"] == bad.sum() and ov["identified"] == len(cells) - bad.sum()
    paths = res.write(tmp_path, bundle=None)  # the outputs and the review page take them as they are
    assert json.loads(paths["summary"].read_text())["overall"]["cells_nonfinite"] == bad.sum()


# --------------------------------------------------------------------------- 3. the run folder


_HOLD = textwrap.dedent("""
    import sys, time
    from leukoscope.io import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def held(tmp_path):
    """A run folder whose lock another process holds; yields (folder, that process's pid)."""
    folder = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        yield folder, p.pid
    finally:
        p.kill()
        p.wait()


def test_a_second_process_on_the_same_out_is_refused(held, cells, run):
    folder, pid = held
    with pytest.raises(FolderLockedError, match=rf"{folder.name}.*pid {pid}"):
        train(cells.table, folder, tiny(), progress=False, log=quiet)
    with pytest.raises(FolderLockedError, match=rf"pid {pid}"):
        cross_validate(cells, folder, tiny(), folds=2, progress=False, log=quiet)
    with pytest.raises(FolderLockedError, match=rf"pid {pid}"):
        adapt(run.bundle_path, cells.table, folder, progress=False, log=quiet)
    assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()


def test_the_lock_is_reentrant_within_a_process_and_released(tmp_path):
    with folder_lock(tmp_path / "r"):
        with folder_lock(tmp_path / "r"):
            pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    quick = _HOLD.replace("time.sleep(60)", "pass")
    out = subprocess.run([sys.executable, "-c", quick, str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "locked" in out.stdout


def test_a_finished_run_given_other_data_is_an_error_with_the_restart_hint(run, cells, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run.out, out)
    other = cells.table.iloc[:-1].reset_index(drop=True)  # one image fewer
    with pytest.raises(RunMismatchError, match=r"trained on other data.*--restart"):
        train(other, out, tiny(), progress=False, log=quiet)
    assert train(cells.table, out, tiny(), progress=False, log=quiet).reused  # the same data: reused
    again = train(other, out, tiny(), progress=False, log=quiet, resume=False)  # --restart trains again
    assert not again.reused and again.meta["metrics"]["n_train"] + again.meta["metrics"]["n_val"] == len(other)


def test_resuming_with_other_images_is_an_error(cells, tmp_path):
    def crash(epoch, row):
        raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(cells.table, out, tiny(), progress=False, log=quiet, on_epoch_end=crash)
    assert load_checkpoint(out / "checkpoint.pt")["data_fingerprint"]
    other = cells.table.iloc[1:].reset_index(drop=True)
    with pytest.raises(RunMismatchError, match=r"checkpoint\.pt was trained on other data.*--restart"):
        train(other, out, tiny(), progress=False, log=quiet)


def test_a_cv_folder_begun_on_other_data_is_refused(cells, tmp_path):
    out = tmp_path / "cv"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**tiny().resolved().to_dict(), "data_fingerprint": "0" * 64}))
    with pytest.raises(RunMismatchError, match="cross-validation run that was trained on other data"):
        cross_validate(cells, out, tiny(), folds=2, progress=False, log=quiet)


# --------------------------------------------------------------------------- 7 (part). corrupt checkpoints


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind", ["pickle", "truncated", "not a checkpoint"])
def test_a_corrupt_checkpoint_is_named_never_unpickled(cells, tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    ck = out / "checkpoint.pt"
    if kind == "pickle":
        ck.write_bytes(pickle.dumps({"model": _Evil()}))
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 1}, ck)
        ck.write_bytes(ck.read_bytes()[:300])
    else:
        torch.save({"weights": torch.zeros(3)}, ck)
    with pytest.raises(CorruptCheckpointError, match=rf"corrupt checkpoint {ck}.*--restart to start over"):
        train(cells.table, out, tiny(epochs=1), progress=False, log=quiet)
    # --restart ignores it
    res = train(cells.table, out, tiny(epochs=1), progress=False, log=quiet, resume=False)
    assert res.bundle_path.exists() and not ck.exists()


def test_cli_names_a_corrupt_checkpoint(cells_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    rc = main(["train", str(cells_root), "--model", "plain_cnn", "--input-size", "32", "--epochs", "1",
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupt checkpoint" in err and "--restart" in err and "Traceback" not in err


# --------------------------------------------------------------------------- 8. ranges


@pytest.mark.parametrize("setting,value,pattern", [
    ("epochs", 0, "epochs must be"), ("input_size", 1, "input_size must be .* at least 32"),
    ("val_fraction", 2.5, r"val_fraction must be in \[0, 1\)"), ("batch_size", 0, "batch_size must be"),
    ("per_class", -1, "per_class must be"), ("lr", float("nan"), "lr must be positive"),
    ("lr", 0.0, "lr must be positive"), ("epochs", 1.5, "epochs must be a whole number"),
])
def test_out_of_range_settings_are_refused_before_any_work(setting, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**{setting: value}).resolved()


def test_cli_refuses_out_of_range_settings_before_reading_data(tmp_path, capsys):
    for opts, word in ((["--epochs", "0"], "epochs"), (["--input-size", "1"], "input_size"),
                       (["--val-fraction", "2.5"], "val_fraction"), (["--batch-size", "0"], "batch-size")):
        try:  # range checks in TrainConfig (exit 2) or at parse time (argparse: SystemExit 2, with the usage)
            rc = main(["train", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "o")] + opts)
        except SystemExit as exc:
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and word in err and "no-such-data" not in err, (opts, err)
    assert not (tmp_path / "o").exists()


def test_a_single_class_is_refused(cells, tmp_path):
    one = cells.table[cells.table["label"] == "LYT"].reset_index(drop=True)
    with pytest.raises(ValueError, match="at least 2 classes.*LYT"):
        train(one, tmp_path / "one", tiny(), progress=False, log=quiet)
    assert not (tmp_path / "one" / "model.safetensors").exists()


def test_report_refuses_a_negative_bootstrap(tmp_path, capsys):
    with pytest.raises(ValueError, match="n_boot must be"):
        make_report(tmp_path, n_boot=-5)
    with pytest.raises(SystemExit) as exc:  # refused when the command line is parsed
        main(["report", str(tmp_path), "--bootstrap", "-5"])
    assert exc.value.code == 2 and "bootstrap" in capsys.readouterr().err


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header states w x h (1-bit grey) with almost no pixel data: tests the size check cheaply."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path


def test_a_100_mp_field_is_not_a_decompression_bomb(tmp_path):
    """Pillow's own default (89 MP warns, 179 MP fails) refused legitimate fields below the documented 400 MP."""
    for w, h in ((10_000, 10_000), (15_000, 15_000)):  # 100 MP and 225 MP
        with pytest.raises(ImageError) as exc:
            load_rgb(_png_header_only(tmp_path / f"{w}.png", w, h), max_pixels=MAX_FIELD_PIXELS)
        assert "decompression bomb" not in exc.value.reason and "absurd" not in exc.value.reason
        assert "truncated" in exc.value.reason or "corrupt" in exc.value.reason  # past the size check
    with pytest.raises(ImageError, match="absurd image size"):  # above the documented 400 MP: refused
        load_rgb(_png_header_only(tmp_path / "441.png", 21_000, 21_000), max_pixels=MAX_FIELD_PIXELS)


def test_zero_epochs_is_allowed_only_when_starting_from_a_bundle(tmp_path):
    with pytest.raises(ValueError, match=r"0 only with --init-from"):
        TrainConfig(epochs=0).resolved()
    assert TrainConfig(epochs=0, init_from=str(tmp_path / "m.safetensors")).check().epochs == 0
