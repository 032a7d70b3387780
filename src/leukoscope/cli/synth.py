"""``leukoscope synth cells|smear``: synthetic single-cell datasets and smear fields."""

from __future__ import annotations

import argparse

import pandas as pd

from leukoscope import taxonomy
from leukoscope.cli._common import check_out_dir, check_out_file, positive_int
from leukoscope.imaging.scale import LMU_UM_PER_PX
from leukoscope.synth import write_cells, write_smear

NAME = "synth"
HELP = "generate synthetic blood-cell images: an LMU-layout cell dataset or a smear field with ground truth"
DESCRIPTION = (
    "Draw synthetic May-Grünwald-Giemsa-like blood-cell images from each class's morphological cues, "
    "deterministic for a seed. They exercise the pipeline end to end; they say nothing about how well "
    "a model recognises real cells."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="synth_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser(
        "cells", help="write a single-cell dataset in the LMU layout with annotations.dat",
        description="Write OUT/CLASS/CLASS_NNNN.tiff (RGB, SIZE px, covering 29 µm like an LMU crop) for "
                    "each class and OUT/annotations.dat ('path gold re1 re2'; two simulated examiners "
                    "re-annotate a fraction of the images, 'nan' elsewhere). Readable by "
                    "'leukoscope data summary OUT'.")
    c.add_argument("--per-class", type=positive_int, required=True, metavar="N", help="images per class")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    c.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0); same seed, same pixels")
    c.add_argument("--size", type=positive_int, default=400, metavar="PX",
                   help="image side in px (default 400, the LMU size); the crop always spans 29 µm")
    c.add_argument("--classes", nargs="+", metavar="CLS",
                   help="class codes to draw (default: all 15, e.g. --classes NGS NGB MYO)")
    c.add_argument("--reannotate-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of images the two simulated examiners re-annotate (default 0.1)")
    c.add_argument("--workers", type=positive_int, default=1, metavar="K", help="processes drawing in parallel (default 1)")

    s = sub.add_parser(
        "smear", help="write a smear field image and its leukocyte boxes (<stem>_truth.csv)",
        description="Write a smear field (red cells, platelets, leukocytes that do not overlap) to FILE "
                    "(.png, .tif or .tiff; the scale is recorded as the image resolution) and the "
                    "leukocytes' bounding boxes and classes to <stem>_truth.csv (x0,y0,x1,y1,cls; px, "
                    "x1/y1 exclusive).")
    s.add_argument("--out", required=True, metavar="FILE", help="image file to write (.png, .tif, .tiff)")
    s.add_argument("--width", type=positive_int, default=2000, metavar="PX", help="field width in px (default 2000)")
    s.add_argument("--height", type=positive_int, default=2000, metavar="PX", help="field height in px (default 2000)")
    s.add_argument("--leukocytes", type=int, default=None, metavar="N",
                   help="number of leukocytes (default: one per 3600 µm² of field)")
    s.add_argument("--classes", nargs="+", metavar="CLS",
                   help="classes the leukocytes are drawn from, uniformly (default: all 15)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    s.add_argument("--um-per-px", type=float, default=LMU_UM_PER_PX, metavar="X",
                   help=f"scale in µm per px (default {LMU_UM_PER_PX:.4f}, the LMU scale)")


def run(args: argparse.Namespace) -> int:
    classes = tuple(args.classes) if args.classes else taxonomy.CLASSES
    if args.synth_command == "cells":
        check_out_dir(args.out)
        out = write_cells(args.out, args.per_class, seed=args.seed, size=args.size, classes=classes,
                          reannotate_fraction=args.reannotate_fraction, workers=args.workers)
        n = args.per_class * len(set(classes))
        print(f"wrote {n} synthetic cells ({len(set(classes))} classes x {args.per_class}) "
              f"and {out / 'annotations.dat'}")
        return 0
    check_out_file(args.out)
    image, truth = write_smear(args.out, args.width, args.height, n_leukocytes=args.leukocytes,
                               seed=args.seed, um_per_px=args.um_per_px, classes=classes)

    n = len(pd.read_csv(truth))
    print(f"wrote {image} ({args.width}x{args.height} px at {args.um_per_px:.4f} µm/px, {n} leukocytes) "
          f"and {truth}")
    return 0
