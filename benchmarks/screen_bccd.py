"""Smear screening on real fields: BCCD detection recall/precision and end-to-end cells/s.

    python benchmarks/screen_bccd.py [--model model.safetensors] [--limit N] [--um-per-px X]

Detection is scored against BCCD's WBC boxes (``../shared/data/smears/bccd``) at IoU >= 0.5 with
one-to-one (Hungarian) matching, separately on the even image ids (the half the detector's
parameters were first hand-tuned on) and the odd ids. Both halves are in-sample now: the default
settings are chosen on all 292 fields; the held-out figure is the cross-validated one of
``benchmarks/detect_cv.py``. BCCD gives no scale: by default it is
7.5 µm / 104 px = 0.0721 µm/px (the median RBC box is 104 px; a red cell is ~7.5 µm); the
red-cell estimate of :func:`leukoscope.imaging.scale_estimate.estimate_field_scale` is reported beside it.
End to end (detect + crop + classify) runs the :class:`~leukoscope.screen.engine.ScreenEngine`
with the bundle given by ``--model``, or an untrained ``plain_cnn`` at 64 px when none is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
BCCD = ROOT.parent / "shared" / "data" / "smears" / "bccd"
BCCD_UM_PER_PX = 7.5 / 104


def untrained_bundle(path: Path) -> Path:
    """Write an untrained ``plain_cnn`` bundle at 64 px (for timings when no trained model is given)."""
    import torch

    from leukoscope import taxonomy
    from leukoscope.models.bundle import make_meta, save_bundle
    from leukoscope.models.registry import create_model, get_config

    torch.manual_seed(0)
    cfg = get_config("plain_cnn", input_size=64)
    model = create_model("plain_cnn", num_classes=len(taxonomy.CLASSES), input_size=64)
    meta = make_meta(classes=taxonomy.CLASSES, model="plain_cnn", input_size=64, mean=cfg.mean, std=cfg.std,
                     um_per_px=cfg.um_per_px, temperature=1.0)
    return save_bundle(model, meta, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model bundle for the end-to-end timing (default: untrained plain_cnn 64 px)")
    ap.add_argument("--limit", type=int, help="only the first N images")
    ap.add_argument("--um-per-px", type=float, default=BCCD_UM_PER_PX)
    ap.add_argument("--e2e-images", type=int, default=60, help="images for the end-to-end timing (default 60)")
    args = ap.parse_args(argv)
    if not BCCD.exists():
        print(f"BCCD not found at {BCCD}; nothing to measure")
        return 1
    from leukoscope.imaging.images import load_rgb
    from leukoscope.imaging.scale_estimate import estimate_field_scale
    from leukoscope.screen.detect import detect_leukocytes, match_boxes

    boxes = pd.read_csv(BCCD / "boxes.csv")
    wbc = boxes[boxes["class"] == "WBC"]
    paths = sorted((BCCD / "JPEGImages").glob("*.jpg"))[: args.limit]
    stats = {"even (tuned)": [0, 0, 0, []], "odd (held out)": [0, 0, 0, []]}
    ests, t_det = [], 0.0
    for p in paths:
        img = load_rgb(p)
        t = time.perf_counter()
        det = detect_leukocytes(img, args.um_per_px)
        t_det += time.perf_counter() - t
        g = wbc[wbc.image == f"JPEGImages/{p.name}"][["xmin", "ymin", "xmax", "ymax"]].to_numpy()
        tp, fp, fn, ious = match_boxes(det[["x0", "y0", "x1", "y1"]].to_numpy(), g, iou=0.5)
        s = stats["even (tuned)" if int(p.stem.split("_")[-1]) % 2 == 0 else "odd (held out)"]
        s[0] += tp
        s[1] += fp
        s[2] += fn
        s[3].extend(ious)
        ests.append(estimate_field_scale(img).um_per_px)
    print(f"BCCD detection at IoU >= 0.5, {args.um_per_px:.4f} µm/px, {len(paths)} images")
    print(f"{'half':<16}{'WBC':>5}{'TP':>5}{'FP':>5}{'FN':>5}{'recall':>8}{'precision':>10}{'mean IoU':>10}")
    tot = [0, 0, 0, []]
    for name, (tp, fp, fn, ious) in stats.items():
        tot = [tot[0] + tp, tot[1] + fp, tot[2] + fn, tot[3] + ious]
        _row(name, tp, fp, fn, ious)
    _row("all", *tot)
    e = np.asarray(ests)
    print(f"scale from red cells: median {np.nanmedian(e):.4f} µm/px (10-90%: {np.nanpercentile(e, 10):.4f}-"
          f"{np.nanpercentile(e, 90):.4f}; failed {int(np.isnan(e).sum())}); from RBC boxes {BCCD_UM_PER_PX:.4f}")
    print(f"detection alone: {len(paths) / t_det:.1f} fields/s ({1000 * t_det / len(paths):.0f} ms per 640x480 field)")

    from leukoscope.models.bundle import load_bundle
    from leukoscope.screen.engine import ScreenEngine

    if args.model:
        bundle = load_bundle(args.model)
    else:
        import tempfile

        bundle = load_bundle(untrained_bundle(Path(tempfile.mkdtemp()) / "untrained.safetensors"))
    sub = paths[: args.e2e_images]
    engine = ScreenEngine(bundle, um_per_px=args.um_per_px, progress=False)
    t = time.perf_counter()
    res = engine.screen(sub)
    dt = time.perf_counter() - t
    n = len(res.cells)
    print(f"end to end (detect + crop + classify, {bundle.meta.get('model')} {bundle.input_size}px"
          f"{'' if args.model else ', untrained'}): {len(sub)} fields, {n} cells in {dt:.1f} s = "
          f"{n / dt:.1f} cells/s, {len(sub) / dt:.1f} fields/s")
    return 0


def _row(name, tp, fp, fn, ious):
    rec = tp / (tp + fn) if tp + fn else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    print(f"{name:<16}{tp + fn:>5}{tp:>5}{fp:>5}{fn:>5}{rec:>8.3f}{prec:>10.3f}{np.mean(ious) if ious else float('nan'):>10.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
