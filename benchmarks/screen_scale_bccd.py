"""The screen's µm/px on BCCD's real fields against the scale their red-cell boxes imply.

    python benchmarks/screen_scale_bccd.py [--limit N] [--csv fields.csv]

BCCD (``../shared/data/smears/bccd``, 292 fields of 640x480 from one microscope and camera) gives
no scale. Each field's *implied* scale is ``7.5 µm / median over its RBC boxes of (width + height) / 2``
(``RBC_DIAMETER_UM``, the project's red-cell diameter; the same formula for every field; the 12
fields without RBC boxes have none). Three estimates are set beside it:

* **old per-field**: the field's own red cells by the estimator before issue 16 (kept below as
  :func:`old_field_scale` to measure against);
* **new per-field**: :func:`leukoscope.imaging.scale_estimate.estimate_field_scale` (the field alone);
* **pooled**: what ``leukoscope screen`` uses for the folder,
  :func:`leukoscope.screen.scale.screen_scales` (all red cells of all fields, one value), with the
  fields beyond the tolerance named.

It prints the ratio estimate / implied (median, worst) and how many fields lie within 15%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.feature import peak_local_max

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
BCCD = ROOT.parent / "shared" / "data" / "smears" / "bccd"


def implied_um_per_px(boxes: pd.DataFrame, rbc_diameter_um: float) -> pd.Series:
    """Per field: ``rbc_diameter_um / median((w + h) / 2)`` over its RBC boxes."""
    rbc = boxes[boxes["class"] == "RBC"]
    side = ((rbc.xmax - rbc.xmin) + (rbc.ymax - rbc.ymin)) / 2
    return rbc_diameter_um / side.groupby(rbc.image).median()


def old_field_scale(img: np.ndarray, rbc_diameter_um: float = 7.5) -> float:
    """The per-field estimator before issue 16 (NaN where it failed): distance-transform peaks of the filled
    red-cell mask, shallow ones dropped, median (2r + 1); a leukocyte's cytoplasm counted as red cells."""
    from leukoscope.imaging.morphology import downsample, remove_small, to_lab

    f = max(1, int(max(img.shape[:2]) // 800))
    lab = to_lab(downsample(img, f))
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    bright = L >= np.percentile(L, 80)
    bg_L, bg_a, bg_b = (float(np.median(ch[bright])) for ch in (L, a, b))
    rbc = ((bg_L - L > 4) | (a - bg_a > 4)) & (bg_b - b < 12)
    rbc = remove_small(ndi.binary_fill_holes(ndi.binary_opening(rbc, iterations=1)), 20)
    if not 0.02 <= rbc.mean() <= 0.97:
        return float("nan")
    dist = ndi.distance_transform_edt(rbc)
    peaks = peak_local_max(dist, min_distance=3, threshold_abs=3, exclude_border=True)
    if len(peaks) < 10:
        return float("nan")
    r = dist[peaks[:, 0], peaks[:, 1]]
    r = r[r >= 0.5 * np.percentile(r, 90)]
    return rbc_diameter_um / (float(np.median(2 * r + 1)) * f) if len(r) >= 10 else float("nan")


def _ratio_line(name: str, ratio: pd.Series, fields: pd.Series) -> str:
    ok = ratio.dropna()
    if ok.empty:
        return f"{name:<16} no estimate"
    worst = (ok - 1).abs().idxmax()
    within = int(((ok - 1).abs() <= 0.15).sum())
    return (f"{name:<16}{len(ok):>7}{ok.median():>9.3f}{ok.min():>8.3f}{ok.max():>8.3f}"
            f"{within:>6}/{len(ratio):<4} {fields[worst]} ({ok[worst]:.3f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, help="only the first N fields")
    ap.add_argument("--csv", help="write the per-field figures to this CSV")
    args = ap.parse_args(argv)
    if not BCCD.exists():
        print(f"BCCD not found at {BCCD}; nothing to measure")
        return 1
    from leukoscope.imaging.images import load_rgb
    from leukoscope.imaging.scale_estimate import RBC_DIAMETER_UM, estimate_field_scale
    from leukoscope.imaging.scale_policy import FIELD_SCALE_TOLERANCE, ScalePolicy
    from leukoscope.io import atomic_write_csv
    from leukoscope.screen.scale import screen_scales

    implied = implied_um_per_px(pd.read_csv(BCCD / "boxes.csv"), RBC_DIAMETER_UM)
    paths = sorted((BCCD / "JPEGImages").glob("*.jpg"))[: args.limit]
    names = [f"JPEGImages/{p.name}" for p in paths]
    t = time.perf_counter()
    old = [old_field_scale(load_rgb(p)) for p in paths]
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    new = [estimate_field_scale(load_rgb(p)) for p in paths]
    t_new = time.perf_counter() - t
    t = time.perf_counter()
    scales, pools = screen_scales(paths, names, ScalePolicy(estimate="group"))
    t_pool = time.perf_counter() - t
    df = pd.DataFrame({"field": names, "implied": [implied.get(n, np.nan) for n in names], "old_field": old,
                       "new_field": [e.um_per_px if e.plausible else np.nan for e in new],
                       "used": [s.um_per_px for s in scales], "source": [s.code for s in scales],
                       "beyond_tolerance": [any("tolerance" in n for n in s.notes) for s in scales]})
    for c in ("old_field", "new_field", "used"):
        df[f"ratio_{c}"] = df[c] / df["implied"]
    (pool,) = pools.values()
    est, spread = pool["estimate"], pool["spread"]
    print(f"BCCD, {len(paths)} fields ({int(df.implied.notna().sum())} with RBC boxes); implied scale: "
          f"{RBC_DIAMETER_UM} µm / median RBC box side (w+h)/2 per field; median implied "
          f"{df.implied.median():.4f} µm/px")
    print(f"pooled: {est['um_per_px']:.4f} µm/px from {est['n_rbc']} red cells in {spread['n_fields']} fields "
          f"(per-field estimates: median {spread['median']:.4f}, IQR {spread['iqr']:.4f}, MAD {spread['mad']:.4f} "
          f"µm/px, {spread['n_fields_measured']} fields measured); {int(df.beyond_tolerance.sum())} fields beyond "
          f"the {FIELD_SCALE_TOLERANCE:.0%} tolerance")
    print(f"{'estimate':<16}{'fields':>7}{'median':>9}{'min':>8}{'max':>8}{'<=15%':>11} worst field (ratio)")
    boxed = df[df.implied.notna()].set_index("field", drop=False)
    for label, col in (("old per-field", "ratio_old_field"), ("new per-field", "ratio_new_field"),
                       ("pooled (screen)", "ratio_used")):
        print(_ratio_line(label, boxed[col], boxed["field"]))
    print(f"time: old per-field {t_old / len(paths) * 1e3:.0f} ms/field, new per-field {t_new / len(paths) * 1e3:.0f} "
          f"ms/field, pooled (incl. reading) {t_pool / len(paths) * 1e3:.0f} ms/field")
    if args.csv:
        atomic_write_csv(df, args.csv)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
