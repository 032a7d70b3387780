"""Smoke tests of the benchmark scripts: their smallest settings run and report the fields.

No timing is asserted: these check that each script runs end to end (naive and ours in their
own processes, tcmalloc or not) and that its JSON holds naive, ours, the ratio and agreement.
The ones that start a script are marked ``slow``: ``make test`` runs them in its second step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _run(args, tmp_path, env=None, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # starts benchmark scripts in subprocesses (10-30 s each)
def test_train_throughput_smoke(tmp_path):
    out = _run([BENCH / "train_throughput.py", "--smoke", "--json", tmp_path / "t.json"], tmp_path)
    res = json.loads((tmp_path / "t.json").read_text())
    for way in ("naive", "ours"):
        assert res[way]["images_per_s"] > 0
        assert 0 <= res[way]["util_fp32_peak"]
    assert res["naive"]["tcmalloc"] is False and res["naive"]["bf16"] is False
    assert res["ours"]["channels_last"] is True
    assert res["ratio"] > 0 and res["forward_gflops_per_image"] > 0
    assert "ratio ours/naive" in out and "| naive" in out


@pytest.mark.slow  # starts benchmark scripts in subprocesses (10-30 s each)
def test_predict_throughput_smoke(tmp_path):
    out = _run([BENCH / "predict_throughput.py", "--smoke", "--synthetic", "--json", tmp_path / "p.json"], tmp_path)
    res = json.loads((tmp_path / "p.json").read_text())
    assert set(res["ways"]) == {"naive", "ours", "ours_fp32", "onnx"}
    for way, row in res["ways"].items():
        assert row["cells_per_s"] > 0 and row["ratio"] > 0
        assert 0 <= row["agree_naive"] <= 1 and row["n_agree_naive"] == 4
    # fp32 paths must give the naive predictions (same weights, same arithmetic up to rounding)
    assert res["ways"]["ours_fp32"]["agree_naive"] == 1.0 and res["ways"]["onnx"]["agree_naive"] == 1.0
    assert res["agreement"]["reference"] == "onnx" and res["agreement"]["n"] == 8
    assert res["ratio"] == res["ways"]["ours"]["ratio"]
    assert "synthetic" in res["images"]
    assert "class agreement" in out


@pytest.mark.slow  # starts benchmark scripts in subprocesses (10-30 s each)
def test_gpu_check_runs_on_cpu(tmp_path):
    if not Path("/bin/bash").exists():
        pytest.skip("needs bash")
    out_dir = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(out_dir), "--device", "cpu", "--steps", "2",
                           "--batch-size", "2", "--model", "plain_cnn", "--input-size", "64", "--pool", "8",
                           "--warmup", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out_dir / "gpu_train.json").read_text())
    assert res["device"] == "cpu"
    for way in ("ours", "naive"):
        assert res[way]["images_per_s"] > 0 and res[way]["batch_size"] == 2 and res[way]["mfu"] >= 0
    assert res["ratio"] > 0 and res["train_gflops_per_image"] > 0
    assert (out_dir / "nvidia-smi.txt").exists()


def test_gpu_peak_table_names_the_h100_and_h200():
    sys.path.insert(0, str(BENCH))
    import gpu_train

    names = dict(gpu_train.GPU_PEAKS)
    assert names["H100"]["bf16"] == 989.0 and names["H200"]["bf16"] == 989.0


def test_cpu_peak_from_flags():
    sys.path.insert(0, str(BENCH))
    import _common as C

    zen4 = {"model": "AMD EPYC", "vendor": "AuthenticAMD", "family": "25", "cpus": 2, "mhz": 2600.0,
            "flags": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    p = C.cpu_peak(zen4)
    assert p["fp32_tflops"] == pytest.approx(2 * 2.6 * 32 / 1000)
    assert p["bf16_tflops"] == pytest.approx(2 * p["fp32_tflops"])
    spr = {**zen4, "vendor": "GenuineIntel", "family": "6", "flags": ["avx2", "fma", "avx512f", "amx_bf16"]}
    assert C.cpu_peak(spr)["fp32_tflops"] == pytest.approx(2 * 2.6 * 64 / 1000)


@pytest.mark.slow  # starts benchmark scripts in subprocesses (10-30 s each)
def test_trained_fixture_and_predict_benchmark_on_a_trained_bundle(tmp_path):
    """trained_resnext.py fine-tunes a run at a larger size; predict_throughput.py --bundle/--data uses it on
    the held-out fold only, with the bf16 guard from bf16_check on untimed images."""
    from leukoscope.data import make_split, read_dataset, write_split
    from leukoscope.synth import write_cells
    from leukoscope.train import train

    cells = write_cells(tmp_path / "cells", per_class=12, size=48, classes=["LYT", "MOB", "MYO", "NGS"])
    table = read_dataset(cells).table
    split = make_split(table, holdout=0.25, seed=0)
    write_split(split, tmp_path / "split.csv")
    train_paths = set(split.loc[split["fold"] != 0, "path"].astype(str))
    train(table[table["path"].astype(str).isin(train_paths)], tmp_path / "run",
          tiny_config(per_class=4, ood_reference=False, model_kwargs={"widths": [8, 16], "hidden": 16, "dropout": 0.0}),
          progress=False, log=lambda s: None)
    common = ["--data", cells, "--split", tmp_path / "split.csv", "--fold", "0"]
    out = _run([BENCH / "trained_resnext.py", "--from", tmp_path / "run", "--out", tmp_path / "big", "--size", "40",
                "--steps", "2", "--batch-size", "4", "--n-check", "6", "--n-bn", "8", "--n-test", "8", *common], tmp_path)
    assert "held-out balanced accuracy at 40px after 2 steps" in out
    from leukoscope.models import read_meta

    meta = read_meta(tmp_path / "big" / "model.safetensors")
    assert meta["input_size"] == 40 and meta["bf16_check"]["n"] == 6 and "fine-tuned 2 steps" in meta["fixture"]
    _run([BENCH / "predict_throughput.py", "--smoke", "--bundle", tmp_path / "big" / "model.safetensors",
          "--images", "8", "--calib", "4", "--json", tmp_path / "p.json", *common], tmp_path)
    res = json.loads((tmp_path / "p.json").read_text())
    held_out = set(split.loc[split["fold"] == 0, "path"].astype(str))
    assert res["model"] == "plain_cnn" and res["input_size"] == 40 and res["bundle"].endswith("model.safetensors")
    assert "fold 0" in res["images"] and res["n_images"] == 8 and len(held_out) == 12
    assert res["bf16_check"]["bf16_guard"] > 0 and "/" in res["ways"]["ours"]["rechecked"]
    assert res["ways"]["ours_fp32"]["agree_naive"] == 1.0


def _two_synthetic_labs(tmp_path) -> None:
    """Labs ``a`` and ``b`` under ``tmp_path``: 4 synthetic LYT and 4 NGS cells each (other seeds in b)."""
    from PIL import Image

    from leukoscope.synth import make_cell

    for lab, seed in (("a", 0), ("b", 500)):
        for c in ("LYT", "NGS"):
            (tmp_path / lab / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(make_cell(c, seed=seed + i + (50 if c == "NGS" else 0), size=48)).save(
                    tmp_path / lab / c / f"{i}.png")


@pytest.mark.slow
def test_crosslab_quick_on_user_labs(tmp_path):
    """benchmarks/crosslab.py on labs given as --lab name=PATH: every protocol's table and the selection score."""
    _two_synthetic_labs(tmp_path)
    out = tmp_path / "out"
    _run([BENCH / "crosslab.py", "--quick", "--lab", f"a={tmp_path / 'a'}", "--lab", f"b={tmp_path / 'b'}",
          "--in-domain-lab", "a", "--out", out], tmp_path)
    res = json.loads((out.parent / "out_quick" / "results.json").read_text())
    assert res["cells"] == {"a": 8, "b": 8} and res["qualifying_labs"] == []
    (v,) = res["variants"]
    assert [r["lab"] for r in v["lolo"]] == ["a", "b"] and {r["k"] for r in v["curve"]} == {0, 1, 3}
    assert 0 <= v["selection"]["score"] <= 1 and v["in_domain"]["n"] == 2
    md = (out.parent / "out_quick" / "results.md").read_text()
    assert "Leave-one-lab-out" in md and "Per-class errors of the selected variant" in md


@pytest.mark.slow
def test_crosslab_finetune_quick_on_user_labs(tmp_path):
    """benchmarks/crosslab_finetune.py on two synthetic labs: a multi-lab LOLO model per lab, scored
    zero-shot, then `adapt` with K cells per class scored on the lab's other cells; the report's tables."""
    _two_synthetic_labs(tmp_path)
    out = tmp_path / "out"
    _run([BENCH / "crosslab_finetune.py", "--quick", "--variants", "S", "--lab", f"a={tmp_path / 'a'}",
          "--lab", f"b={tmp_path / 'b'}", "--out", out], tmp_path, timeout=600)
    jobs = json.loads((out.parent / "out_quick" / "results.json").read_text())["jobs"]
    assert [j["key"] for j in jobs] == ["S/lolo/a/k0/d0", "S/adapt/a/k2/d0", "S/lolo/b/k0/d0", "S/adapt/b/k2/d0"]
    lolo_a, adapt_a = jobs[0], jobs[1]
    assert lolo_a["zero_shot"]["n"] == 8 and {c["class"] for c in lolo_a["zero_shot"]["per_class"]} == {"LYT", "NGS"}
    assert adapt_a["n_shots"] == 4 and adapt_a["k_per_class"] == {"LYT": 2, "NGS": 2}
    assert adapt_a["adapted"]["n"] == 4 and 0 <= adapt_a["adapted"]["accuracy"] <= 1
    assert adapt_a["seconds_adapt"] > 0 and lolo_a["seconds_train"] > 0
    md = (out.parent / "out_quick" / "results.md").read_text()
    assert "Selection score over the 2 labs" in md and "Per-class errors of variant S" in md
