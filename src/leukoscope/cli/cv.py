"""``leukoscope cv DATA --folds 5 --preset fast --out RUN [--split S]``."""

from __future__ import annotations

import argparse
import time

from leukoscope.cli._common import positive_int, progress_on
from leukoscope.cli.train import add_train_options, config_and_data
from leukoscope.train.cv import cross_validate

NAME = "cv"
HELP = "k-fold cross-validation: one model per fold, out-of-fold predictions for every image"
DESCRIPTION = (
    "Make (or reuse with --split) a stratified k-fold split, train one model per fold into RUN/fold{K}/, and "
    "write RUN/split.csv, RUN/config.json and RUN/predictions.csv (path,label,fold,pred,prob_<CLASS>...; each "
    "image once, predicted by the model of the fold where it was tested). Running the command again keeps "
    "finished folds and resumes an interrupted one. Classes with fewer images than folds are left out, with a "
    "warning. 'leukoscope report RUN' turns the result into the paper's tables and figures."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_options(p)
    p.add_argument("--folds", type=positive_int, default=5, help="number of folds (default 5)")
    p.add_argument("--split", metavar="CSV", help="use this split file instead of making one")
    p.add_argument("--out", metavar="RUN", help="output folder (required)")


def run(args: argparse.Namespace) -> int:
    parsed = config_and_data(args)
    if parsed is None:  # --list-models
        return 0
    cfg, ds = parsed
    t0 = time.time()
    res = cross_validate(ds, args.out, cfg, folds=args.folds, split=args.split, progress=progress_on(args))
    s = res.summary
    print(f"{args.out}: out-of-fold balanced accuracy {s['balanced_accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}, "
          f"accuracy {s['accuracy']:.4f} over {s['n']} images ({time.time() - t0:.0f}s)")
    return 0
