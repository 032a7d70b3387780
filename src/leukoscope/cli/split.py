"""``leukoscope split PATH --folds 5 --seed 0 --out split.csv``."""

from __future__ import annotations

import argparse
import warnings

from leukoscope.cli._common import add_label_map, check_out_file, positive_int
from leukoscope.data import make_split, read_dataset, write_split

NAME = "split"
HELP = "make a stratified k-fold, hold-out or patient-wise split and write it as CSV"
DESCRIPTION = (
    "Write path,label,fold[,patient] so that training and evaluation use exactly this split. "
    "fold is each image's test fold; with --holdout, fold 0 is the test set and fold 1 the training set. "
    "When every image has a patient, folds are patient-wise (grouped, stratified as far as groups allow)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset (any layout that 'leukoscope data summary' reads)")
    p.add_argument("--folds", type=positive_int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--holdout", type=float, metavar="FRACTION",
                   help="stratified hold-out instead of k-fold, e.g. 0.2 for the paper's 80/20 split")
    p.add_argument("--by-patient", choices=("auto", "yes", "no"), default="auto",
                   help="group folds by patient: auto (when every image has one), yes (required), no")
    p.add_argument("--out", required=True, help="output CSV (checked before the dataset is read)")
    add_label_map(p)


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    ds = read_dataset(args.path, label_map=args.label_map)
    by = {"auto": "auto", "yes": True, "no": False}[args.by_patient]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = make_split(ds.table, folds=args.folds, seed=args.seed, holdout=args.holdout, by_patient=by)
    for w in caught:
        print(f"warning: {w.message}")
    write_split(split, args.out)
    counts = split.groupby(["fold", "label"]).size().unstack(fill_value=0)
    print(counts.to_string())
    print(f"wrote {args.out}: {len(split)} images, {split['fold'].nunique()} folds"
          + (" (patient-wise)" if "patient" in split and split["patient"].notna().all() else ""))
    return 0
