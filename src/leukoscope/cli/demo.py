"""``leukoscope demo``: the end-to-end job on synthetic cells (what ``make demo`` runs)."""

from __future__ import annotations

import argparse

from leukoscope.cli._common import add_progress, check_out_dir, positive_int, progress_on
from leukoscope.demo import DEMO_DEFAULTS, SYNTHETIC_WARNING, run_demo

NAME = "demo"
HELP = "end-to-end demo on synthetic data: generate cells, cross-validate, report, screen a smear"
DESCRIPTION = (
    "Generate a synthetic single-cell dataset (LMU layout, 15 classes, simulated re-annotations), run "
    "k-fold cross-validation with the fast CPU preset, write the evaluation report and screen a synthetic "
    "smear with the fold-0 model. An interrupted demo resumes. " + SYNTHETIC_WARNING
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEMO_DEFAULTS
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--per-class", type=positive_int, default=d["per_class"],
                   help=f"synthetic cells generated per class (default {d['per_class']})")
    p.add_argument("--folds", type=positive_int, default=d["folds"], help=f"cross-validation folds (default {d['folds']})")
    p.add_argument("--epochs", type=positive_int, default=d["epochs"], help=f"epochs per fold (default {d['epochs']})")
    p.add_argument("--train-per-class", type=positive_int, default=d["train_per_class"],
                   help=f"balanced training images drawn per class per epoch (default {d['train_per_class']})")
    p.add_argument("--input-size", type=positive_int, default=d["input_size"],
                   help=f"model input size in px (default {d['input_size']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (default 0)")
    p.add_argument("--no-screen", action="store_true", help="skip the smear-screening step")
    p.add_argument("--no-adapt", action="store_true", help="skip adapting the model to a second synthetic lab")
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    res = run_demo(args.out, per_class=args.per_class, folds=args.folds, epochs=args.epochs,
                   train_per_class=args.train_per_class, input_size=args.input_size, seed=args.seed,
                   screen=not args.no_screen, adapt_lab=not args.no_adapt, progress=progress_on(args))
    bar = "=" * 78
    print(bar)
    print(f"LeukoScope demo finished in {res['seconds']['total']:.0f} s.")
    print(f"  out-of-fold balanced accuracy {res['balanced_accuracy']:.3f}, macro-F1 {res['macro_f1']:.3f}")
    print(f"  report:      {res['report']}")
    print(f"  predictions: {res['predictions']}")
    if "screen" in res:
        ov = res["screen_summary"]
        pct = "n/a" if ov.get("blast_pct") is None else f"{ov['blast_pct']:.1f}%"
        print(f"  smear screen: {ov['cells_found']} cells found ({ov['unidentified']} referred for review), "
              f"blasts {pct}; review page {res['screen']}")
    if "lab_b" in res:
        lb = res["lab_b"]
        print(f"  second lab:  lab B zero-shot {lb['zero_shot_accuracy']:.2f} -> after adapting on {lb['k']} "
              f"cells/class {lb['adapted_accuracy']:.2f}; model {lb['model']}")
    print()
    print("  " + SYNTHETIC_WARNING)
    print("  To run the same on the real AML-Cytomorphology_LMU dataset (TCIA, doi:10.7937/tcia.2019.36f5o9ld):")
    print("    leukoscope data summary PATH/TO/AML-Cytomorphology_LMU")
    print("    leukoscope cv PATH/TO/AML-Cytomorphology_LMU --folds 5 --preset fast --out runs/lmu")
    print("    leukoscope report runs/lmu --annotations PATH/TO/AML-Cytomorphology_LMU/annotations.dat")
    print("  (README.md, 'Running on the real dataset', has the paper preset for a GPU.)")
    print(bar)
    return 0
