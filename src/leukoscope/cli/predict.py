"""``leukoscope predict MODEL IMAGE_OR_FOLDER... --out preds.csv``."""

from __future__ import annotations

import argparse
import sys

from leukoscope.cli._common import um_per_px_arg
from leukoscope.io import atomic_write_csv
from leukoscope.models import load_bundle
from leukoscope.predict import predict_paths

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
    "median score) look unlike the training data."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle (RUN/model.safetensors, or the RUN folder)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--um-per-px", type=_um_arg, metavar="X|estimate",
                   help="µm per pixel of the input images, when known; 'estimate': measure it from the red cells "
                        "(7.5 µm), pooled per input folder (the default for a model trained with --scale estimate)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: mean probability over the 8 rotations by 90° and mirror images "
                        "of each cell (8x the compute)")
    p.add_argument("--uncalibrated", action="store_true", help="probabilities without temperature scaling")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true")


def _um_arg(v: str):
    if v == "estimate":
        return v
    return um_per_px_arg(v)


def run(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.model, device=args.device)
    res = predict_paths(bundle, args.inputs, um_per_px=args.um_per_px, batch_size=args.batch_size,
                        calibrated=not args.uncalibrated, progress=not args.no_progress, tta=args.tta)
    for e in res.errors:
        print(f"skipped {e['path']}: {e['reason']}")
    for src, est in (res.scale.get("estimates") or {}).items():
        print(f"scale of {src}: " + (f"{est['um_per_px']:.4f} µm/px from {est['n_rbc']} red cells in {est['n_images']} images"
                                     if est.get("plausible") else f"not estimated ({est.get('reason')}): resized"))
    atomic_write_csv(res.table, args.out)
    counts = res.table["pred"].value_counts()
    print(f"wrote {args.out}: {len(res.table)} images" + (f", {len(res.errors)} skipped" if res.errors else "")
          + ("; " + ", ".join(f"{c} {n}" for c, n in counts.items()) if len(counts) else ""))
    if res.ood.get("warning"):
        print(f"warning: {res.ood['warning']} (ood_flag in {args.out})", file=sys.stderr)
    elif res.ood.get("note"):
        print(f"note: {res.ood['note']}", file=sys.stderr)
    if not len(res.table) and res.errors:
        return 1
    return 0
