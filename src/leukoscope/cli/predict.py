"""``leukoscope predict MODEL IMAGE_OR_FOLDER... --out preds.csv``."""

from __future__ import annotations

import argparse

NAME = "predict"
HELP = "classify single-cell images with a model bundle; blast and atypical scores per image"
DESCRIPTION = (
    "Write path,pred,p_blast,p_atypical,prob_<CLASS>... (calibrated probabilities; p_blast = MYO + MOB, "
    "p_atypical = the atypical classes). Folders are searched recursively for images. Unreadable images are "
    "reported and skipped; they never end the run. With --um-per-px the images are resampled to the model's "
    "physical scale; otherwise each is resized to the model input."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle (RUN/model.safetensors, or the RUN folder)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--um-per-px", type=float, metavar="X", help="µm per pixel of the input images, when known")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--uncalibrated", action="store_true", help="probabilities without temperature scaling")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from leukoscope.io import atomic_write_csv
    from leukoscope.models import load_bundle
    from leukoscope.predict import predict_paths

    bundle = load_bundle(args.model, device=args.device)
    res = predict_paths(bundle, args.inputs, um_per_px=args.um_per_px, batch_size=args.batch_size,
                        calibrated=not args.uncalibrated, progress=not args.no_progress)
    for e in res.errors:
        print(f"skipped {e['path']}: {e['reason']}")
    atomic_write_csv(res.table, args.out)
    counts = res.table["pred"].value_counts()
    print(f"wrote {args.out}: {len(res.table)} images" + (f", {len(res.errors)} skipped" if res.errors else "")
          + ("; " + ", ".join(f"{c} {n}" for c, n in counts.items()) if len(counts) else ""))
    if not len(res.table) and res.errors:
        return 1
    return 0
