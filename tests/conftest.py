"""Shared fixtures. Real data are read from ``<repo>/../shared/data`` and never copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEUKOSCOPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a clear reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (tests read ../shared/data; a clone elsewhere skips these)")
    return p


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
