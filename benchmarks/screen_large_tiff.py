"""Screening a whole scan larger than memory wants: throughput, bounded memory, every cell once.

    python benchmarks/screen_large_tiff.py [--size 20480] [--um-per-px 0.1] [--model M] [--tmp DIR] [--keep]
                                           [--old-ref REF | --no-old]

Writes a tiled, JPEG-compressed pyramid-free TIFF of ``size x size`` RGB pixels (20480² =
1.26 GB uncompressed) from a generator of 512x512 tiles, so that writing never holds the
scan: the content is synthetic smear blocks (:func:`leukoscope.synth.make_smear`, four
different ones laid out in a grid) whose leukocyte boxes give the truth. The scan is then
screened twice by ``leukoscope screen``, each in its own child process: the OLD way (the
package as it was at ``--old-ref``, before the fast path, extracted with ``git archive``) and
the NEW way (this checkout). For each, the table reports the wall time and megapixels per
second, the child's CPU seconds (user + system; on a machine shared with other work the wall
time depends on the load, the CPU time much less), its peak resident memory
(``os.wait4``'s ``ru_maxrss`` of that child alone), and the cells found against the truth
(IoU >= 0.5, one to one); then the ratio, how many boxes the two ways share, and the load
average before and after. The files are written to a temporary folder and deleted afterwards
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
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


#: The last commit before the fast screening path (issue 16): the OLD way of the comparison.
OLD_REF = "c6872f5"


def old_package(ref: str, dest: Path) -> Path | None:
    """``src/`` of the repository at ``ref``, extracted into ``dest``; None when git cannot give it."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True).stdout
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"old code at {ref} not available ({exc}); measuring the new way only")
        return None
    return dest / "src"


def screen_child(src: Path, model: Path, scan: Path, out: Path, tile_size: int) -> dict:
    """Run ``leukoscope screen`` from ``src`` in a child process: wall s, CPU s, peak RSS (MB), return code."""
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, "-m", "leukoscope", "screen", str(model), str(scan), "--out", str(out),
           "--tile-size", str(tile_size), "--no-review", "--quiet"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024,
            "rc": proc.returncode, "log": stdout[-2000:] + stderr[-4000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20480, help="scan side in pixels (default 20480)")
    ap.add_argument("--um-per-px", type=float, default=0.1)
    ap.add_argument("--tile-size", type=int, default=2048, help="screening tile (default 2048)")
    ap.add_argument("--model", help="model bundle (default: an untrained plain_cnn at 64 px)")
    ap.add_argument("--tmp", help="folder for the scan (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scan and the outputs")
    ap.add_argument("--old-ref", default=OLD_REF, help=f"git revision of the OLD way (default {OLD_REF})")
    ap.add_argument("--no-old", action="store_true", help="measure the new way only")
    args = ap.parse_args(argv)

    from leukoscope.screen.detect import match_boxes

    work = Path(tempfile.mkdtemp(prefix="leukoscope-scan-", dir=args.tmp))
    try:
        scan = work / "scan.tif"
        t = time.perf_counter()
        truth = write_scan(scan, args.size, args.um_per_px)
        t_write = time.perf_counter() - t
        model = Path(args.model) if args.model else untrained_bundle(work / "untrained.safetensors")
        ways = {"new": ROOT / "src"}
        old_src = None if args.no_old else old_package(args.old_ref, work / "old")
        if old_src is not None:
            ways = {f"old ({args.old_ref})": old_src, **ways}
        mp = args.size * args.size / 1e6
        raw_gb = mp * 3 / 1e3
        print(f"{'scan':<30}{args.size}x{args.size} RGB, {args.um_per_px} µm/px, {raw_gb:.2f} GB raw, "
              f"{scan.stat().st_size / 1e6:.0f} MB on disk (JPEG tiles 512), written in {t_write:.0f} s; "
              f"model {'untrained plain_cnn 64 px' if not args.model else args.model}")
        load0 = os.getloadavg()
        rows, boxes = {}, {}
        for name, src in ways.items():
            out = work / f"out-{name.split()[0]}"
            r = screen_child(src, model, scan, out, args.tile_size)
            if r["rc"] != 0:
                print(f"{name}: screen failed (exit {r['rc']})\n{r['log']}")
                return 1
            cells = pd.read_csv(out / "cells.csv")
            b = cells[["x0", "y0", "x1", "y1"]].to_numpy()
            tp, fp, fn, ious = match_boxes(b, truth[["x0", "y0", "x1", "y1"]].to_numpy(), iou=0.5)
            im = json.loads((out / "summary.json").read_text())["images"][0]
            boxes[name] = set(map(tuple, b.tolist()))
            rows[name] = r
            print(f"{name:<30}{im['tiles']} tiles of {args.tile_size} px: {r['wall_s']:.1f} s wall "
                  f"({mp / r['wall_s']:.2f} MP/s), {r['cpu_s']:.1f} CPU s ({mp / r['cpu_s']:.2f} MP per CPU s); "
                  f"peak RSS {r['peak_mb']:.0f} MB; cells {len(cells)} / {len(truth)} (TP {tp}, FP {fp}, FN {fn}; "
                  f"recall {tp / max(1, tp + fn):.3f}, precision {tp / max(1, tp + fp):.3f}, "
                  f"mean IoU {np.mean(ious) if len(ious) else float('nan'):.3f}); "
                  f"cross-tile duplicates removed {im['duplicates_removed']}", flush=True)
        load1 = os.getloadavg()
        if len(rows) == 2:
            (o, ro), (n, rn) = rows.items()
            same = len(boxes[o] & boxes[n])
            print(f"{'new / old':<30}{ro['wall_s'] / rn['wall_s']:.2f}x wall, {ro['cpu_s'] / rn['cpu_s']:.2f}x CPU; "
                  f"boxes in both {same} (old only {len(boxes[o]) - same}, new only {len(boxes[n]) - same})")
        print(f"{'load average (1/5/15 min)':<30}before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
              f"after {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} on {os.cpu_count()} CPUs")
        if args.keep:
            print(f"kept {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
