"""``leukoscope screen MODEL SMEAR... --out DIR [--per-scan] [--um-per-px X] [--source NAME] [--refer-below P] [--tile-size N]``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from leukoscope.cli._common import (EXIT_FAILED, add_device, add_progress, add_strict, check_model_path, check_out_dir,
                                    partial_exit, positive_int, progress_on, um_per_px_arg)
from leukoscope.data.readers import iter_image_paths
from leukoscope.io import atomic_write_csv
from leukoscope.models.bundle import load_bundle
from leukoscope.screen.batch import screen_batch
from leukoscope.screen.detect import check_um_per_px
from leukoscope.screen.engine import (DEFAULT_DETECT_WORKERS, DEFAULT_REFER_BELOW, DEFAULT_TILE_SIZE, ScreenEngine,
                                      ScreenWarning)

NAME = "screen"
HELP = "find, crop and classify the leukocytes of smear images; differential count, blast %, review page"
DESCRIPTION = (
    "Screen smear fields or whole scans (large TIFFs are read tile by tile) with a model bundle. "
    "Writes DIR/cells.csv (one row per cell), DIR/summary.json (differential counts and blast percentage "
    "with 95% CIs, flags, the µm/px used and where it came from) and DIR/review.html (a self-contained gallery "
    "sorted by P(blast)), and DIR/crops (each cell at the smear's native resolution, for the review station). "
    "Cells whose calibrated confidence is below --refer-below, or whose model input is mostly outside the field, are "
    "counted as 'unidentified' for review. Finished tiles are checkpointed in DIR/checkpoint: an interrupted screen "
    "resumes where it stopped. With --per-scan, every file is a scan of its own: DIR/<scan>/ holds its "
    "cells.csv, summary.json, review.html and crops, and DIR/index.csv and DIR/index.json list each scan's status "
    "(ok, resumed, failed), cells, blast percentage and folder; run again, the batch skips finished scans "
    "and resumes the interrupted one at its tile. Images that cannot be screened are listed in DIR/errors.csv (with "
    "--per-scan: in the index); the others' results are written and the exit code stays 0 (1 with --strict, or "
    "when no image could be screened). Not for diagnostic use."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model bundle (model.safetensors written by 'leukoscope train')")
    p.add_argument("smears", nargs="+", metavar="SMEAR", help="smear images (JPEG/PNG/TIFF) or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--um-per-px", type=um_per_px_arg, metavar="X",
                   help="scale of the smears in µm per pixel (default: from the file's OME or TIFF resolution "
                        "metadata, else estimated from the red cells of all smears of a folder (or --source) with "
                        "a warning)")
    p.add_argument("--source", metavar="NAME",
                   help="all SMEARs come from one microscope and camera: pool their red cells into one scale estimate "
                        "(default: one estimate per folder)")
    p.add_argument("--refer-below", type=float, default=DEFAULT_REFER_BELOW, metavar="P",
                   help=f"refer cells whose calibrated top probability is below P (default {DEFAULT_REFER_BELOW})")
    p.add_argument("--tile-size", type=positive_int, default=DEFAULT_TILE_SIZE, metavar="N",
                   help=f"tile size in pixels for large scans (default {DEFAULT_TILE_SIZE})")
    p.add_argument("--batch-size", type=positive_int, default=64, help="cells per forward pass (default 64)")
    p.add_argument("--per-scan", action="store_true",
                   help="one result folder per scan (file) and a run index DIR/index.csv; resumes an interrupted "
                        "batch at the scan and tile where it stopped")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help=f"threads that read and analyse tiles at once (default {DEFAULT_DETECT_WORKERS}: the cores, "
                        "at most 2); the cells found do not depend on it")
    p.add_argument("--whole-tiles", action="store_true",
                   help="run the detector over every tile's whole region instead of around candidate nuclei "
                        "(slower; the same cells)")
    p.add_argument("--no-review", action="store_true", help="do not write review.html")
    add_device(p)
    add_strict(p)
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    if args.um_per_px is not None:
        check_um_per_px(args.um_per_px, "--um-per-px")
    check_out_dir(args.out)
    check_model_path(args.model)
    bundle = load_bundle(args.model, device=args.device)
    engine = ScreenEngine(bundle, refer_below=args.refer_below, tile_size=args.tile_size, um_per_px=args.um_per_px,
                          batch_size=args.batch_size, progress=progress_on(args), fast=not args.whole_tiles,
                          workers=args.workers)
    smears = [str(p) for p in iter_image_paths(args.smears, keep_empty_dirs=True)]  # empty folder: reported
    if args.per_scan:
        return _run_per_scan(engine, smears, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenWarning)  # the same notes are printed per image below
        result = engine.screen(smears, out_dir=args.out,
                               groups=None if args.source is None else [args.source] * len(smears))
    failed = [im for im in result.summary["images"] if im["status"] != "ok"]
    err_file = Path(args.out) / "errors.csv"
    if failed:
        atomic_write_csv(pd.DataFrame({"image": [im["image"] for im in failed],
                                       "error": [im["error"] for im in failed]}), err_file)
    elif err_file.exists():
        err_file.unlink()  # a stale list from an earlier run into the same folder
    if failed and args.strict:
        for im in failed:
            print(f"error: {im['error']}", file=sys.stderr)
        return partial_exit(args, len(failed), len(result.summary["images"]), err_file)  # nothing claimed
    paths = result.write(args.out, bundle=bundle, review=not args.no_review)
    for im in result.summary["images"]:
        if im["status"] != "ok":
            print(f"error: {im['error']}", file=sys.stderr)
            continue
        for w in im["warnings"]:
            print(f"warning: {im['image']}: {w}", file=sys.stderr)
        pct = "n/a" if im["blast_pct"] is None else f"{im['blast_pct']:.1f}%"
        print(f"{im['image']}: {im['cells_found']} cells ({im['unidentified']} unidentified), blasts {pct}, "
              f"{im['um_per_px']:.4f} µm/px ({im['um_per_px_source']})")
    ov = result.summary["overall"]
    pct = "n/a" if ov["blast_pct"] is None else f"{ov['blast_pct']:.1f}% (95% CI {ov['blast_pct_ci'][0]:.1f}-{ov['blast_pct_ci'][1]:.1f}%)"
    print(f"overall: {ov['cells_found']} cells, {ov['identified']} identified, {ov['unidentified']} unidentified; "
          f"blasts {pct}" + (f"; flags: {'; '.join(ov['flag_text'])}" if ov["flag_text"] else ""))
    if (result.summary.get("ood") or {}).get("warning"):
        print(f"warning: {result.summary['ood']['warning']} (ood_flag in cells.csv; flagged cells are referred)",
              file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if ov["images_ok"]:
        print(f"review, correct and sign off the calls in the browser: leukoscope review {args.out}")
    if ov["images_ok"] == 0:
        print("error: no image could be screened", file=sys.stderr)
        return EXIT_FAILED
    return partial_exit(args, len(failed), len(result.summary["images"]), err_file)


def _run_per_scan(engine: ScreenEngine, smears: list[str], args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScreenWarning)  # each scan's notes are in its summary.json
        index = screen_batch(engine, smears, args.out, review=not args.no_review)
    for row in index.itertuples():
        if row.status == "failed":
            print(f"error: {row.error}", file=sys.stderr)
            continue
        pct = "n/a" if row.blast_pct is None or row.blast_pct != row.blast_pct else f"{row.blast_pct:.1f}%"
        print(f"{row.scan}: {row.status}, {row.cells} cells, blasts {pct} -> {args.out}/{row.folder}")
    ok = int((index.status != "failed").sum())
    print(f"{ok} of {len(index)} scans screened; index: {args.out}/index.csv")
    if ok:
        print(f"review, correct and sign off a scan's calls in the browser: leukoscope review {args.out}/<folder>")
    failed = len(index) - ok
    if not ok:
        return EXIT_FAILED
    return partial_exit(args, failed, len(index), Path(args.out) / "index.csv")
