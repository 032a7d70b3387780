"""benchmarks/hostile_inputs.py: the sweep covers every item of issue 17 with 60+ inputs, and the inputs
fixed on the command line (messages instead of tracebacks) show no traceback. A fast subset is run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("hostile_inputs", REPO / "benchmarks" / "hostile_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_sweep_has_60_inputs_over_every_item(sweep):
    cases = sweep._cases()
    assert len(cases) >= 60
    assert {str(i) for i in range(1, 13)} <= {c.item for c in cases}
    assert len({c.what for c in cases}) == len(cases)  # one row per input


FAST = ("--out that is", "--batch-size", "--label-map", "agreement on a folder", "export --opset 1",
        "predict on an empty folder", "one unreadable file of two", "cut at a line boundary", "disk full",
        "zero-byte TIFF", "random bytes as model", "an unknown option", "cv run folder", "Windows line endings")


@pytest.mark.slow  # about 15 commands, each in its own process
def test_fixed_inputs_give_messages_not_tracebacks(sweep, tmp_path):
    cases = [c for c in sweep._cases() if c.mine and any(k in c.what for k in FAST)
             and not c.what.startswith(("train", "evaluate", "screen"))]
    assert len(cases) >= 12
    rows = sweep.run_sweep(cases, tmp_path)
    bad = [f"{r.case.what}: rc {r.rc}, {r.message}\n{r.output[-1500:]}" for r in rows
           if r.traceback != "no" or r.rc not in (0, 1, 2, 4)]
    assert not bad, "\n\n".join(bad)
    by = {r.case.what: r for r in rows}
    assert by["predict --batch-size 0"].rc == 2 and "must be 1 or more" in by["predict --batch-size 0"].message
    assert by["predict --strict, one unreadable file of two"].rc == 1
    assert by["predict, one unreadable file of two"].rc == 0
    assert "1 of 2 inputs failed" in by["predict, one unreadable file of two"].message
    full = next(r for w, r in by.items() if w.startswith("disk full while writing predictions"))
    assert full.rc == 4 and "p.csv" in full.message
    assert not (tmp_path / "cases").joinpath("x").exists()
