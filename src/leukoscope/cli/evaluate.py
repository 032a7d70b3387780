"""``leukoscope evaluate MODEL DATA... [--out DIR] [--group-by source|folder] [--stain-normalize]``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from leukoscope.cli._common import (add_device, add_label_map, add_progress, add_strict, check_model_path, check_out_dir,
                                    fmt, nonneg_int, partial_exit, progress_on, um_per_px_arg)
from leukoscope.data import fold_tables, read_dataset
from leukoscope.evaluate.external import evaluate_sets, write_outputs
from leukoscope.io import atomic_write_csv
from leukoscope.models.bundle import load_bundle, read_meta
from leukoscope.models.ood import fit_reference, store_reference

NAME = "evaluate"
HELP = "score a model on labelled sets from other labs: per source and class, with an out-of-distribution warning"
DESCRIPTION = (
    "Score MODEL (a model.safetensors bundle) on one or more labelled sets (LMU folder, folder per class, CSV "
    "manifest or folder with labels.csv), per source and per class, on the classes the model knows (cells of "
    "other classes are counted and left out). Each image is brought to the model's physical scale: "
    "--um-per-px, else the dataset's µm/px, else estimated per source from its red blood cells.\n"
    "Writes DIR/evaluate.json (per-source accuracy, balanced accuracy, macro-F1 with bootstrap intervals, "
    "scale decisions, OOD statistics), DIR/per_class.csv and DIR/predictions.csv.\n\n"
    "Out-of-distribution check: the bundle stores the model's feature, colour and confidence statistics on "
    "in-distribution cells it was not trained on ('leukoscope train' and 'cv' fit them on the run's "
    "validation images); every evaluation compares each source against them and prints a WARNING line for "
    "a source that looks shifted. --fit-reference DATA (e.g. a held-out split of the training lab) replaces "
    "the stored reference, or adds one to a bundle that has none.\n\n"
    "example: leukoscope evaluate runs/pbc/model.safetensors ../shared/data/external_wbc --group-by folder "
    "--out runs/pbc/external\n\n"
    "Exit code: 0, also when some images could not be read (listed in DIR/errors.csv, a line says how many); "
    "1 with --strict when any could not be; 2 for a usage or input error."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle (model.safetensors, or the run folder holding it)")
    p.add_argument("data", nargs="+", help="labelled dataset(s), any layout 'leukoscope data summary' reads")
    p.add_argument("--out", metavar="DIR", help="output folder (default: print only)")
    p.add_argument("--group-by", choices=("source", "folder"), default="source",
                   help="group rows by the table's source column (default) or by each image's parent folder "
                        "(external_wbc: images/<source>/)")
    p.add_argument("--um-per-px", type=um_per_px_arg, metavar="X",
                   help="µm/px of every input image (overrides the data)")
    p.add_argument("--estimate-scale", choices=("group", "image", "off"), default="group",
                   help="where µm/px is unknown: estimate per group from red cells (default), per image, or not "
                        "at all (resize)")
    p.add_argument("--stain-normalize", action="store_true",
                   help="Reinhard stain normalisation onto the reference stored in the bundle")
    p.add_argument("--fit-reference", metavar="DATA",
                   help="in-distribution labelled cells the model was not trained on: compute the OOD and stain "
                        "reference on them and store it in MODEL before evaluating")
    p.add_argument("--split", metavar="CSV", help="split file: evaluate only the rows of DATA in --fold (paths as "
                   "in DATA, or relative to the split file's folder, as for 'leukoscope train --split')")
    p.add_argument("--fold", type=int, metavar="K", help="fold of --split to evaluate")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: mean probability over the 8 rotations by 90° and mirror images "
                        "of each cell (8x the compute; the OOD check uses the plain view)")
    p.add_argument("--bootstrap", type=nonneg_int, default=1000, metavar="N", help="bootstrap resamples (0: none)")
    add_label_map(p)
    add_device(p)
    add_strict(p)
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    if (args.split is None) != (args.fold is None):
        raise ValueError("--split and --fold go together: evaluate the rows of DATA in fold K")
    check_out_dir(args.out)
    check_model_path(args.model)
    if args.fit_reference:
        bundle = load_bundle(args.model, device=args.device)
        ref_table = read_dataset(args.fit_reference, label_map=args.label_map).table
        ref = fit_reference(bundle, ref_table, um_per_px=args.um_per_px)
        path = store_reference(bundle.path, ref)
        print(f"stored the in-distribution reference ({ref['n']} cells, accuracy {ref['accuracy']:.3f}) in {path}")
    read_meta(args.model)  # a clear error for a file that is not a bundle
    bundle = load_bundle(args.model, device=args.device)
    tables = []
    for d in args.data:
        ds = read_dataset(d, label_map=args.label_map)
        t = ds.table
        if args.split is not None:
            _, t = fold_tables(t, args.split, args.fold)
            t = t.drop(columns=["fold"])
            if t.empty:
                raise ValueError(f"no image of {d} is in fold {args.fold} of {args.split}")
        tables.append(t)
    res = evaluate_sets(bundle, tables, group_by=args.group_by, um_per_px=args.um_per_px,
                        estimate_scale=args.estimate_scale, stain_normalize=args.stain_normalize,
                        n_boot=args.bootstrap, tta=args.tta, progress=progress_on(args))
    print(f"{'source':<18}{'n':>5}{'other':>7}  {'µm/px':>7}  {'accuracy':>9}  {'bal.acc':>8}  {'macro-F1':>8}  {'conf':>5}")
    for g, e in res.per_source.items():
        um = (res.scale.get(g) or {}).get("um_per_px_median") if isinstance(res.scale.get(g), dict) else None
        acc = e.get("accuracy", {}).get("value", float("nan"))
        bal = e.get("balanced_accuracy", {}).get("value", float("nan"))
        f1 = e.get("macro_f1", {}).get("value", float("nan"))
        conf = res.ood.get(g, {}).get("mean_max_prob", float("nan"))
        print(f"{g:<18}{e['n_scored']:>5}{e['n_unknown_class']:>7}  {fmt(um, 4):>7}  {fmt(acc):>9}  {fmt(bal):>8}  "
              f"{fmt(f1):>8}  {fmt(conf, 2):>5}")
    for w in res.warnings:
        print(w if w.startswith("WARNING") else f"warning: {w}")
    for e in res.errors[:5]:
        print(f"skipped {e['path']}: {e['reason']}")
    n_total = sum(len(t) for t in tables)
    err_file = Path(args.out) / "errors.csv" if args.out else None
    if err_file is not None and res.errors:
        atomic_write_csv(pd.DataFrame(res.errors), err_file)
    if args.out and not (res.errors and args.strict):  # --strict and a failed image: nothing claimed
        files = write_outputs(res, args.out)
        print(f"wrote {', '.join(str(p) for p in files.values())}")
    return partial_exit(args, len(res.errors), n_total, err_file)
