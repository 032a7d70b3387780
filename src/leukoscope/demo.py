"""The end-to-end demo on synthetic data: the main job of ``make demo``.

Generates a synthetic single-cell dataset in the LMU layout (with simulated
re-annotations), runs stratified k-fold cross-validation with the fast CPU preset,
writes the paper-style evaluation report, screens a synthetic smear with one of
the fold models, and teaches that model a second synthetic lab (another stain and
scale, :data:`leukoscope.synth.LABS` ``"B"``): zero-shot accuracy on lab B, then after
adapting on 10 of its cells per class (:func:`leukoscope.train.adapt.adapt`, replaying
lab A). Everything lands under one folder, and a run that is interrupted resumes
(finished folds are kept).

>>> from leukoscope.demo import run_demo
>>> result = run_demo("demo_out")          # doctest: +SKIP
>>> result["report"]                        # doctest: +SKIP
'demo_out/cv/report/report.html'
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from leukoscope.data import read_dataset
from leukoscope.models.bundle import load_bundle
from leukoscope.report import make_report
from leukoscope.screen import ScreenEngine
from leukoscope.synth import write_cells, write_smear
from leukoscope.train import cross_validate, preset
from leukoscope.train.adapt import adapt, take_k_per_class

#: Settings sized so the whole demo finishes in well under 10 minutes on 2 CPU cores.
DEMO_DEFAULTS = dict(per_class=60, folds=5, epochs=6, train_per_class=150, input_size=64, seed=0,
                     smear_size=2400, smear_leukocytes=24, lab_b_per_class=20, adapt_k=10)

SYNTHETIC_WARNING = (
    "These data are SYNTHETIC: the numbers show that the pipeline works end to end, "
    "not how well a model recognises real blood cells."
)


def run_demo(out: str | os.PathLike = "demo_out", *, per_class: int = DEMO_DEFAULTS["per_class"],
             folds: int = DEMO_DEFAULTS["folds"], epochs: int = DEMO_DEFAULTS["epochs"],
             train_per_class: int = DEMO_DEFAULTS["train_per_class"],
             input_size: int = DEMO_DEFAULTS["input_size"], seed: int = DEMO_DEFAULTS["seed"],
             smear_size: int = DEMO_DEFAULTS["smear_size"],
             smear_leukocytes: int = DEMO_DEFAULTS["smear_leukocytes"], screen: bool = True,
             lab_b_per_class: int = DEMO_DEFAULTS["lab_b_per_class"], adapt_k: int = DEMO_DEFAULTS["adapt_k"],
             adapt_lab: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the demo; returns the paths of what it wrote and its headline numbers."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    cells = out / "cells"
    if not (cells / "annotations.dat").exists():
        log(f"[1/5] generating {per_class} synthetic cells per class in {cells}")
        write_cells(cells, per_class=per_class, seed=seed, workers=min(2, os.cpu_count() or 1),
                    progress=progress)
    else:
        log(f"[1/5] synthetic cells already in {cells}; kept")
    timings["synth_cells"] = time.time() - t0

    t = time.time()
    ds = read_dataset(cells)
    cfg = preset("fast", epochs=epochs, per_class=train_per_class, input_size=input_size, seed=seed)
    log(f"[2/5] {folds}-fold cross-validation, preset fast ({cfg.model} at {cfg.input_size}px, "
        f"{cfg.epochs} epochs of {cfg.per_class} images per class)")
    cv = cross_validate(ds, out / "cv", cfg, folds=folds, seed=seed, progress=progress, log=log)
    timings["cross_validation"] = time.time() - t

    t = time.time()
    log("[3/5] writing the evaluation report")
    metrics = make_report(out / "cv", annotations=cells / "annotations.dat", banner=SYNTHETIC_WARNING)
    timings["report"] = time.time() - t
    result = {
        "out": str(out),
        "predictions": str(out / "cv" / "predictions.csv"),
        "report": str(out / "cv" / "report" / "report.html"),
        "balanced_accuracy": cv.summary["balanced_accuracy"],
        "macro_f1": cv.summary["macro_f1"],
        "metrics": metrics,
    }

    if screen:
        t = time.time()

        smear_path, truth_path = write_smear(out / "smear" / "synthetic_smear.tiff", width=smear_size,
                                             height=smear_size, n_leukocytes=smear_leukocytes, seed=seed)
        log(f"[4/5] screening the synthetic smear {smear_path} ({smear_leukocytes} leukocytes drawn)")
        bundle = load_bundle(out / "cv" / "fold0" / "model.safetensors")
        screened = ScreenEngine(bundle, progress=progress).screen([smear_path], out_dir=out / "screen")
        screened.write(out / "screen", bundle=bundle)
        timings["screen"] = time.time() - t
        result.update({"screen": str(out / "screen" / "review.html"),
                       "smear_truth": str(truth_path),
                       "screen_summary": screened.summary["overall"]})
    else:
        log("[4/5] screening skipped")
    if adapt_lab:
        t = time.time()
        result["lab_b"] = demo_lab_b(out, ds.table, out / "cv" / "fold0" / "model.safetensors",
                                     per_class=lab_b_per_class, k=adapt_k, seed=seed, progress=progress, log=log)
        timings["adapt_lab_b"] = time.time() - t
    else:
        log("[5/5] adaptation to a second lab skipped")
    timings["total"] = time.time() - t0
    result["seconds"] = timings
    return result


def _accuracy(bundle_path, table) -> float:
    bundle = load_bundle(bundle_path)
    p = bundle.predict_proba(list(table["path"]), table["um_per_px"].tolist())
    return float((np.array(bundle.classes)[p.argmax(1)] == table["label"].to_numpy()).mean())


def demo_lab_b(out: Path, lab_a_table, model_path, *, per_class: int, k: int, seed: int = 0, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Step 5: write synthetic lab B, score ``model_path`` on it zero-shot, adapt on ``k`` cells per class
    (replaying lab A's cells), score again on lab B's other cells."""

    lab_dir = out / "lab_B"
    if not (lab_dir / "labels.csv").exists():
        write_cells(lab_dir, per_class=per_class, seed=seed, size=128, lab="B",
                    workers=min(2, os.cpu_count() or 1), progress=progress)
    lab = read_dataset(lab_dir).table
    rest = lab[~lab["path"].isin(take_k_per_class(lab, k, seed)["path"])]
    adapted = out / "adapt_lab_B" / "model.safetensors"
    log(f"[5/5] a second lab (synthetic lab B: another stain and scale, {per_class} cells per class): "
        f"adapting on {k} cells per class, replaying lab A")
    if not adapted.exists():
        adapt(model_path, lab, adapted.parent, replay_table=lab_a_table, k_per_class=k, seed=seed,
              progress=progress, log=lambda m: None)
    zero, after = _accuracy(model_path, rest), _accuracy(adapted, rest)
    log(f"lab B zero-shot {zero:.2f} -> after adapting on {k} cells/class {after:.2f} "
        f"({len(rest)} other lab B cells)")
    return {"zero_shot_accuracy": zero, "adapted_accuracy": after, "k": k, "n_scored": int(len(rest)),
            "model": str(adapted)}
