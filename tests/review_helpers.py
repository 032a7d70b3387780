"""A real screen run for the review tests: a tiny model trained on synthetic cells screens a
synthetic smear (made once per test session, then copied), and helpers for the station's server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
_RUN: dict[str, Path] = {}

#: The tiny model: 4 classes, 32 px, a few seconds of training on 2 cores.
TINY_CLASSES = ["LYT", "MOB", "MYO", "NGS"]


def train_tiny_model(root: Path) -> Path:
    from leukoscope.data import read_dataset
    from leukoscope.synth import write_cells
    from leukoscope.train import TrainConfig, train

    cells = write_cells(root / "cells", per_class=8, size=48, classes=TINY_CLASSES)
    cfg = TrainConfig(model="plain_cnn", input_size=32, epochs=3, per_class=8, batch_size=8, lr=3e-3, threads="1",
                      workers=1, model_kwargs={"widths": [8, 16], "hidden": 16, "dropout": 0.1}, ood_reference=False)
    train(read_dataset(cells).table, root / "run", cfg, progress=False, log=lambda s: None)
    return root / "run" / "model.safetensors"


def screen_with(model: Path, smears: list, out: Path, **engine_kwargs) -> Path:
    """Screen ``smears`` with the bundle ``model`` into ``out`` (cells.csv + summary.json)."""
    from leukoscope.models.bundle import load_bundle
    from leukoscope.screen import ScreenEngine

    bundle = load_bundle(model)
    ScreenEngine(bundle, progress=False, **engine_kwargs).screen(smears, out_dir=out).write(out, review=False)
    return out


def screen_run(tmp_path_factory) -> dict:
    """``{"root", "model", "smear", "screen"}`` of a session-wide screen run (do not modify it: copy it)."""
    if "root" not in _RUN:
        from leukoscope.synth import write_smear

        root = tmp_path_factory.mktemp("review_run")
        model = train_tiny_model(root)
        smear, _ = write_smear(root / "smear" / "field.tif", 1400, 900, n_leukocytes=8, seed=11, um_per_px=0.1)
        screen_with(model, [smear], root / "screen")
        _RUN.update(root=root, model=model, smear=smear, screen=root / "screen")
    return dict(_RUN)


def copy_run(run: dict, dest: Path) -> Path:
    """A copy of the screen output folder (its cells.csv names the smear by absolute path)."""
    out = dest / "screen"
    shutil.copytree(run["screen"], out, ignore=shutil.ignore_patterns("review.sqlite*", "checkpoint"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, log: Path) -> subprocess.Popen:
    """``python -m leukoscope review ARGS --port PORT`` in a subprocess; returns once it answers."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LEUKOSCOPE_NO_TCMALLOC="1")
    fh = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "leukoscope", "review", *args, "--port", str(port)],
                            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"review server exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"review server did not answer within 60 s: {log.read_text()}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The session's screen run (see :func:`screen_run`)."""
    return screen_run(tmp_path_factory)


@pytest.fixture
def store(run, tmp_path):
    """A fresh review of a copy of the screen run."""
    from leukoscope.review import ReviewStore

    s = ReviewStore.open_or_create(copy_run(run, tmp_path))
    yield s
    s.close()
