"""Screening a whole scan larger than memory wants: bounded memory, every cell once.

    python benchmarks/screen_large_tiff.py [--size 20480] [--um-per-px 0.1] [--model M] [--tmp DIR] [--keep]

Writes a tiled, JPEG-compressed pyramid-free TIFF of ``size x size`` RGB pixels (20480² =
1.26 GB uncompressed) from a generator of 512x512 tiles, so that writing never holds the
scan: the content is synthetic smear blocks (:func:`leukoscope.synth.make_smear`, four
different ones laid out in a grid) whose leukocyte boxes give the truth. The scan is
then screened by ``leukoscope screen`` in a child process, and the table reports the
child's peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), the time, and
the cells found against the truth (IoU >= 0.5, one to one). The file is written to a
temporary folder and deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from screen_bccd import untrained_bundle  # noqa: E402  (one definition for both benchmarks)


def write_scan(path: Path, size: int, um: float, block: int = 2048, variants: int = 4, tile: int = 512):
    """A ``size x size`` tiled TIFF of synthetic smear blocks and its truth table."""
    import tifffile

    from leukoscope.synth import make_smear

    if block % tile:
        raise ValueError("block must be a multiple of the TIFF tile")
    blocks, truths = [], []
    for k in range(variants):
        img, truth = make_smear(block, block, seed=100 + k, um_per_px=um)
        blocks.append(img)
        truths.append(truth)
    nb = -(-size // block)
    rows = []
    for by in range(nb):
        for bx in range(nb):
            t = truths[(by * 3 + bx) % variants]
            t = t.assign(x0=t.x0 + bx * block, x1=t.x1 + bx * block, y0=t.y0 + by * block, y1=t.y1 + by * block)
            rows.append(t[(t.x1 <= size) & (t.y1 <= size)])
    truth = pd.concat(rows, ignore_index=True)

    def tiles():
        for ty in range(0, size, tile):
            for tx in range(0, size, tile):
                b = blocks[((ty // block) * 3 + tx // block) % variants]
                oy, ox = ty % block, tx % block
                out = np.zeros((tile, tile, 3), np.uint8)
                h, w = min(tile, size - ty), min(tile, size - tx)
                out[:h, :w] = b[oy:oy + h, ox:ox + w]
                yield out

    res = 1e4 / um
    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, resolution=(res, res),
                     resolutionunit="CENTIMETER", bigtiff=True)
    return truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20480, help="scan side in pixels (default 20480)")
    ap.add_argument("--um-per-px", type=float, default=0.1)
    ap.add_argument("--tile-size", type=int, default=2048, help="screening tile (default 2048)")
    ap.add_argument("--model", help="model bundle (default: an untrained plain_cnn at 64 px)")
    ap.add_argument("--tmp", help="folder for the scan (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scan and the outputs")
    args = ap.parse_args(argv)

    from leukoscope.screen.detect import match_boxes

    work = Path(tempfile.mkdtemp(prefix="leukoscope-scan-", dir=args.tmp))
    try:
        scan = work / "scan.tif"
        t = time.perf_counter()
        truth = write_scan(scan, args.size, args.um_per_px)
        t_write = time.perf_counter() - t
        model = Path(args.model) if args.model else untrained_bundle(work / "untrained.safetensors")
        out = work / "out"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "leukoscope", "screen", str(model), str(scan), "--out", str(out),
               "--tile-size", str(args.tile_size), "--no-review"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        t_screen = time.perf_counter() - t
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            return proc.returncode
        cells = pd.read_csv(out / "cells.csv")
        tp, fp, fn, ious = match_boxes(cells[["x0", "y0", "x1", "y1"]].to_numpy(),
                                       truth[["x0", "y0", "x1", "y1"]].to_numpy(), iou=0.5)
        raw_gb = args.size * args.size * 3 / 1e9
        import json

        summary = json.loads((out / "summary.json").read_text())
        im = summary["images"][0]
        print(f"{'scan':<28}{args.size}x{args.size} RGB, {args.um_per_px} µm/px, {raw_gb:.2f} GB raw, "
              f"{scan.stat().st_size / 1e6:.0f} MB on disk (JPEG tiles 512), written in {t_write:.0f} s")
        print(f"{'screen':<28}{im['tiles']} tiles of {args.tile_size} px, {t_screen:.0f} s "
              f"({args.size * args.size / 1e6 / t_screen:.1f} MP/s), µm/px from {im['um_per_px_source']}")
        print(f"{'peak RSS (screen process)':<28}{peak_mb:.0f} MB  ({peak_mb / (raw_gb * 1000):.2f}x of the raw scan)")
        print(f"{'cells found / truth':<28}{len(cells)} / {len(truth)}  (TP {tp}, FP {fp}, FN {fn}; recall "
              f"{tp / max(1, tp + fn):.3f}, precision {tp / max(1, tp + fp):.3f}, mean IoU {np.mean(ious):.3f}); "
              f"cross-tile duplicates removed {im['duplicates_removed']}")
        if args.keep:
            print(f"kept {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
