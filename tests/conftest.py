"""Shared fixtures. Real data are read from ``<repo>/../shared/data`` and never copied.

The tiny training configuration (:data:`TINY`, :func:`tiny_config`) and the 4-class synthetic
dataset (fixtures ``cells_root`` and ``cells``, written once per session) are defined here only;
test modules add their own overrides on top.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from leukoscope.data import read_dataset
from leukoscope.synth import write_cells
from leukoscope.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEUKOSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))

#: the 4 classes of the shared synthetic dataset (two blast-like, two normal), 6 images each at 48 px
SYNTH_CLASSES = ["LYT", "MOB", "MYO", "NGS"]
SYNTH_PER_CLASS = 6

#: the smallest training run that still exercises the whole loop: a 2-layer CNN on 32 px inputs
TINY = dict(model="plain_cnn", input_size=32, epochs=1, per_class=6, batch_size=8, lr=3e-3, threads="1",
            workers=1, model_kwargs={"widths": [8, 16], "hidden": 16, "dropout": 0.1})


def tiny_config(**overrides) -> TrainConfig:
    """The tiny training configuration with ``overrides`` (a plain function: spawned DDP workers use it too)."""
    return TrainConfig(**{**TINY, **overrides})


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a clear reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (tests read ../shared/data; a clone elsewhere skips these)")
    return p


@pytest.fixture(scope="session")
def cells_root(tmp_path_factory) -> Path:
    """Folder of the shared synthetic dataset (LMU layout), written once per session.

    Tests must not write into it: the teardown checks that its files are the ones written.
    """
    root = write_cells(tmp_path_factory.mktemp("cells"), per_class=SYNTH_PER_CLASS, size=48, classes=SYNTH_CLASSES)
    files = sorted(p.relative_to(root) for p in root.rglob("*"))
    yield root
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files, \
        f"a test wrote into the shared synthetic dataset's folder {root}"


@pytest.fixture(scope="session")
def cells(cells_root):
    """The shared synthetic dataset as read by :func:`leukoscope.data.read_dataset`.

    Shared by every module, so a test that changed its table in place would change the others'
    data: the teardown checks that the table is as read.
    """
    ds = read_dataset(cells_root)
    before = ds.table.copy()
    yield ds
    pd.testing.assert_frame_equal(ds.table, before, obj="the shared synthetic table (changed in place by a test)")


@pytest.fixture
def lmu_sample() -> Path:
    return shared_path("aml_lmu_sample")


@pytest.fixture
def pbc_root() -> Path:
    return shared_path("pbc")


@pytest.fixture
def external_root() -> Path:
    return shared_path("external_wbc")


@pytest.fixture
def bccd_root() -> Path:
    return shared_path("smears", "bccd")
