"""``leukoscope data summary PATH``: what is in a labelled single-cell collection."""

from __future__ import annotations

import argparse

from leukoscope import taxonomy
from leukoscope.cli._common import (add_json_out, add_label_map, add_progress, add_strict, check_out_file, partial_exit,
                                    progress_on, write_json)
from leukoscope.data import check_images, read_dataset

NAME = "data"
HELP = "inspect a labelled single-cell dataset (LMU folder, folder per class, or CSV manifest)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("summary", help="per-class counts (Table 1's count column) and problems found",
                       description="Detect the layout of PATH, decode every image once, and print the "
                                   "per-class counts with full class names and every problem found. "
                                   "Exit code 0, also when some files were skipped (a line says how many); "
                                   "1 with --strict when any was.")
    s.add_argument("path", help="LMU folder (with annotations.dat), folder per class, CSV manifest, "
                                "or a folder holding labels.csv")
    add_label_map(s)
    add_json_out(s)
    s.add_argument("--no-decode", action="store_true",
                   help="only list files; do not decode each image to check it")
    add_progress(s)
    add_strict(s)
    s.add_argument("--max-problems", type=int, default=20, metavar="N",
                   help="print at most N problems (all go to --json; default 20)")


def run(args: argparse.Namespace) -> int:
    check_out_file(args.json, "--json")
    ds = read_dataset(args.path, label_map=args.label_map)
    if not args.no_decode:
        check_images(ds, progress=progress_on(args))
    summary = ds.summary()
    print(f"{ds.root}  (layout: {ds.layout})")
    print(f"{'class':<6} {'name':<24} {'images':>7}")
    for cls, n in summary["classes"].items():
        print(f"{cls:<6} {taxonomy.CLASS_NAMES[cls]:<24} {n:>7}")
    n_cls = sum(1 for n in summary["classes"].values() if n)
    print(f"{'total':<31} {summary['n_images']:>7}  in {n_cls} classes")
    if "images" in summary:
        im = summary["images"]
        print("image modes: " + ", ".join(f"{m} {n}" for m, n in im["modes"].items())
              + "; sizes: " + ", ".join(f"{s} ({n})" for s, n in list(im["sizes"].items())[:4]))
    for note in summary["notes"][: args.max_problems]:
        print(f"note: {note}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} files:")
        for s in summary["skipped"][: args.max_problems]:
            print(f"  {s['path']}: {s['reason']}")
        if len(summary["skipped"]) > args.max_problems:
            print(f"  ... and {len(summary['skipped']) - args.max_problems} more (see --json)")
    write_json(summary, args.json)
    n_skipped = len(summary["skipped"])
    return partial_exit(args, n_skipped, summary["n_images"] + n_skipped, args.json)
