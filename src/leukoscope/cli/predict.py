"""``leukoscope predict MODEL IMAGE_OR_FOLDER... --out preds.csv``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from leukoscope.cli._common import (EXIT_FAILED, add_device, add_progress, add_strict, check_model_path,
                                    check_out_file, partial_exit, positive_int, progress_on,
                                    um_per_px_arg)
from leukoscope.evaluate.predictions import write_table
from leukoscope.io import atomic_write_csv
from leukoscope.models import load_bundle
from leukoscope.predict import expand_inputs, predict_paths

NAME = "predict"
HELP = "classify single-cell images with a model bundle; blast and atypical scores per image"
DESCRIPTION = (
    "Write path,pred,p_blast,p_atypical,prob_<CLASS>... (calibrated probabilities; p_blast = MYO + MOB, "
    "p_atypical = the atypical classes). Folders are searched recursively for images. Unreadable images are "
    "reported and skipped; they never end the run. With --um-per-px X (or 'estimate', from the red cells; the "
    "default for a model trained with --scale estimate) the images are resampled to the model's physical scale; "
    "otherwise each is resized to the model input. With a bundle that stores an out-of-distribution reference "
    "(every 'leukoscope train' run), the table ends with ood_score (1.0 = the threshold calibrated on the training "
    "run's validation cells) and ood_flag, and a warning goes to stderr when more than 20% of the images (or their "
    "median score) look unlike the training data.\n"
    "Exit code: 0 when every image was classified, and also when some could not be read (they are listed in "
    "OUT's errors file, <stem>.errors.csv, and a line says how many); 1 when none could be (or any, with --strict); "
    "2 for a usage or input error."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle (RUN/model.safetensors, or the RUN folder)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="single-cell image files, or folders searched recursively for them")
    p.add_argument("--out", required=True, help="output CSV (checked before any image is read)")
    p.add_argument("--um-per-px", type=_um_arg, metavar="X|estimate",
                   help="µm per pixel of the input images, when known; 'estimate': measure it from the red cells "
                        "(7.5 µm), pooled per input folder (the default for a model trained with --scale estimate)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                   help="images per forward pass (default 64)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: mean probability over the 8 rotations by 90° and mirror images "
                        "of each cell (8x the compute)")
    p.add_argument("--uncalibrated", action="store_true", help="probabilities without temperature scaling")
    add_device(p)
    add_strict(p)
    add_progress(p)


def _um_arg(v: str):
    if v == "estimate":
        return v
    return um_per_px_arg(v)


def errors_file(out: str | Path) -> Path:
    """Where ``predict --out OUT`` lists the images it could not classify: ``<stem>.errors.csv`` beside OUT."""
    out = Path(out)
    return out.with_name(out.stem + ".errors.csv")


def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    check_model_path(args.model)
    if not expand_inputs(args.inputs):
        raise ValueError(f"no image files in {', '.join(args.inputs)} (looked for .png, .jpg, .tif(f), .bmp, "
                         "recursively); nothing written")
    bundle = load_bundle(args.model, device=args.device)
    res = predict_paths(bundle, args.inputs, um_per_px=args.um_per_px, batch_size=args.batch_size,
                        calibrated=not args.uncalibrated, progress=progress_on(args), tta=args.tta)
    for e in res.errors:
        print(f"skipped {e['path']}: {e['reason']}")
    for src, est in (res.scale.get("estimates") or {}).items():
        print(f"scale of {src}: " + (f"{est['um_per_px']:.4f} µm/px from {est['n_rbc']} red cells in {est['n_images']} images"
                                     if est.get("plausible") else f"not estimated ({est.get('reason')}): resized"))
    n_total = len(res.table) + len(res.errors)
    err_file = errors_file(args.out)
    if res.errors:
        atomic_write_csv(pd.DataFrame(res.errors, columns=["path", "reason"]), err_file)
    elif err_file.exists():
        err_file.unlink()  # a stale list from an earlier run of the same --out
    if not len(res.table):
        print(f"error: none of the {n_total} images could be classified; see {err_file}; {args.out} not written",
              file=sys.stderr)
        return EXIT_FAILED
    if res.errors and args.strict:
        return partial_exit(args, len(res.errors), n_total, err_file)  # --strict: nothing claimed
    write_table(res.table, args.out)
    counts = res.table["pred"].value_counts()
    print(f"wrote {args.out}: {len(res.table)} images" + (f", {len(res.errors)} skipped" if res.errors else "")
          + ("; " + ", ".join(f"{c} {n}" for c, n in counts.items()) if len(counts) else ""))
    if res.ood.get("warning"):
        print(f"warning: {res.ood['warning']} (ood_flag in {args.out})", file=sys.stderr)
    elif res.ood.get("note"):
        print(f"note: {res.ood['note']}", file=sys.stderr)
    return partial_exit(args, len(res.errors), n_total, err_file)
