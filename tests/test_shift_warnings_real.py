"""Shift warnings on real data (issue 16): a PBC model trained with the default preset flags few held-out PBC
cells, and warns on LMU cells (predict) and on BCCD smear fields (screen). Figures: docs/crosslab.md, "Shift warnings"."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from leukoscope.cli.main import main
from leukoscope.data.readers import read_manifest
from leukoscope.models.ood import SHIFT_BANNER

TRAIN_PER_CLASS, HELD_OUT_PER_CLASS = 60, 30


@pytest.mark.slow
@pytest.mark.shared_data
def test_pbc_model_flags_few_held_out_cells_and_warns_on_other_labs(tmp_path, capsys):
    from conftest import shared_path

    pbc = read_manifest(shared_path("pbc"), check_files=False).table
    lmu, bccd = shared_path("aml_lmu_sample"), shared_path("smears", "bccd", "JPEGImages")
    pbc = pbc[pbc["label"].notna()]
    train = pbc.groupby("label").sample(TRAIN_PER_CLASS, random_state=0)
    held = pbc.drop(train.index).groupby("label").sample(HELD_OUT_PER_CLASS, random_state=1)
    train[["path", "label"]].to_csv(tmp_path / "train.csv", index=False)
    run = tmp_path / "run"
    # the default preset; a quarter of the cells validate (and calibrate the OOD threshold)
    assert main(["train", str(tmp_path / "train.csv"), "--per-class", str(TRAIN_PER_CLASS), "--epochs", "6",
                 "--val-fraction", "0.25", "--no-progress", "--out", str(run)]) == 0
    thr = json.loads((run / "metadata.json").read_text())["reference"]["threshold"]
    assert thr["quantile"] == 0.99 and thr["validation_false_alarm_rate"] <= 0.05
    bundle = str(run / "model.safetensors")
    capsys.readouterr()

    # held-out PBC cells (neither trained nor calibrated on): at most 5 % flagged, no warning
    assert main(["predict", bundle, *held["path"].astype(str), "--out", str(tmp_path / "held.csv"),
                 "--no-progress"]) == 0
    assert "look unlike the training data" not in capsys.readouterr().err
    flags = pd.read_csv(tmp_path / "held.csv")["ood_flag"]
    assert len(flags) == len(held) and flags.mean() <= 0.05

    # another lab's cells: the warning on stderr
    assert main(["predict", bundle, str(lmu), "--out", str(tmp_path / "lmu.csv"), "--no-progress"]) == 0
    assert "cells look unlike the training data; calls are unreliable" in capsys.readouterr().err

    # another lab's smear fields: the warning on stderr, in summary.json and on the review page
    fields = sorted(bccd.glob("*.jpg"))[:10]
    out = tmp_path / "screen"
    assert main(["screen", bundle, *map(str, fields), "--out", str(out), "--quiet"]) == 0
    assert "cells look unlike the training data; calls are unreliable" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ood"]["warning"] and summary["ood"]["fraction"] > 0.2
    assert SHIFT_BANNER in (out / "review.html").read_text()
    cells = pd.read_csv(out / "cells.csv")
    assert cells.loc[cells["ood_flag"], "referred"].all()
