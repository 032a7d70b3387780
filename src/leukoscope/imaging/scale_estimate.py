"""Estimating µm/px from the image itself, with the red cells as an internal ruler.

A normal red blood cell in a dried, stained smear is about 7.5 µm across
(:data:`RBC_DIAMETER_UM`). Almost every single-cell crop shows a few of them around
the leukocyte, so their diameter in pixels gives the image's scale when nobody
stated it:

1. optical density ``-log(I / background)`` per channel (background = the 99th
   percentile of each channel, so a yellowish CellaVision or grey smartphone
   background works as well as LMU's white one);
2. **nucleus** = the darkest class of a three-class Otsu threshold on the summed OD;
3. **cells** = green OD above the background level (its mode plus six robust
   standard deviations, or Otsu if that is lower), holes filled, so that the pale
   centre of a red cell does not split it;
4. the Euclidean distance transform of the cell mask peaks at each cell's centre with
   the cell's radius, even where red cells touch each other; peaks are taken
   largest first, each suppressing the peaks inside its disc;
5. a peak is a red cell when its disc (enlarged by 30%) holds no nucleus stain and the
   disc's centre is far enough from the image border that the border does not cut it;
6. the radius of each is the median length of 24 rays from its centre to the edge
   (rays leaving the image or running into a touching cell dropped): the inscribed
   radius alone would be the smallest, not the mean, radius of a slightly oval cell;
7. the area-weighted median radius picks the red-cell population (debris and
   fragments are small); peaks within ±30% of it are kept and their median
   diameter is the answer: ``um_per_px = 7.5 / diameter_px``.

Whole smear fields, where red cells pack and touch, have their own method,
:func:`estimate_field_scale` (the screener's).

Every parameter is relative to the image (no pixel sizes), so the estimate follows a
resize: an LMU crop resized by ``f`` gives ``(29/400) / f``.
An estimate resting on fewer than :data:`MIN_RBC` red cells, or outside
:data:`PLAUSIBLE_UM_PER_PX`, is flagged ``plausible=False`` with the reason; callers
fall back to a stated scale or to no rescaling and say so.

>>> from leukoscope.imaging.images import load_rgb
>>> est = estimate_scale(load_rgb("NGS/NGS_0957.tiff"))        # doctest: +SKIP
>>> round(est.um_per_px, 3), est.n_rbc                         # doctest: +SKIP
(0.071, 4)
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import filters
from skimage.feature import peak_local_max

from leukoscope.imaging.images import ImageError, load_rgb
from leukoscope.imaging.morphology import downsample, remove_small, to_lab

#: Diameter of a normal red blood cell in a stained smear (µm); the ruler.
RBC_DIAMETER_UM = 7.5
#: Estimates outside this range (µm/px) are treated as failures.
PLAUSIBLE_UM_PER_PX = (0.03, 0.5)
#: Fewest red cells a per-image estimate may rest on.
MIN_RBC = 3


@dataclass
class ScaleEstimate:
    """The scale of one image (or one pooled set of images) and what it rests on."""

    um_per_px: float          # NaN when no red cell was found
    diameter_px: float        # median red-cell diameter in pixels (NaN when none)
    n_rbc: int                # red cells the estimate rests on
    plausible: bool           # enough red cells and inside PLAUSIBLE_UM_PER_PX
    reason: str = ""          # why not plausible ("" when plausible)
    n_images: int = 1
    spread: float = float("nan")   # interquartile range / median of per-cell diameters

    def to_dict(self) -> dict:
        return asdict(self)


def _optical_density(img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float64)
    bg = np.percentile(x.reshape(-1, 3), 99, axis=0).clip(1, 255)
    return -np.log(np.clip((x + 1.0) / (bg + 1.0), 1e-3, 1.0))


def cell_masks(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cells, nucleus)`` boolean masks of an RGB uint8 image (see the module docstring)."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    od = _optical_density(img)
    total = ndi.uniform_filter(od.sum(-1), 3)
    try:
        _, t_hi = filters.threshold_multiotsu(total, 3)
    except ValueError:  # a flat image
        return np.zeros(total.shape, bool), np.zeros(total.shape, bool)
    nucleus = total > t_hi
    green = ndi.uniform_filter(od[..., 1], 3)
    vals = green[~nucleus]
    if vals.size < 16 or np.ptp(vals) <= 0:
        return np.zeros(total.shape, bool), nucleus
    hist, edges = np.histogram(vals, bins=256)
    mode = 0.5 * (edges[hist.argmax()] + edges[hist.argmax() + 1])
    below = vals[vals <= mode]
    sigma = 1.4826 * np.median(mode - below) if below.size > 10 else 0.01
    thr = min(filters.threshold_otsu(vals), mode + max(6 * sigma, 0.1 * (np.percentile(vals, 95) - mode)))
    cells = ndi.binary_fill_holes(green > thr)
    return cells, nucleus


def find_rbcs(img: np.ndarray) -> list[tuple[float, float, float]]:
    """Red cells of an RGB image as ``(y, x, radius_px)``, the red-cell population only."""
    cells, nucleus = cell_masks(img)
    if not cells.any():
        return []
    h, w = cells.shape
    dist = ndi.distance_transform_edt(cells)
    # local maxima of the distance map, one per plateau (no k-d tree: skimage's
    # peak_local_max builds one, which crashed on large plateaus in a long-running process)
    is_max = (dist >= 3) & (dist == ndi.maximum_filter(dist, size=5))
    lab, n = ndi.label(is_max)
    if n == 0:
        return []
    peaks = np.array(ndi.maximum_position(dist, lab, np.arange(1, n + 1)), dtype=int).reshape(-1, 2)
    vals = dist[peaks[:, 0], peaks[:, 1]]
    accepted: list[tuple[int, int, float]] = []
    for i in np.argsort(-vals, kind="stable"):  # non-maximum suppression, largest disc first
        y, x, v = int(peaks[i, 0]), int(peaks[i, 1]), float(vals[i])
        if any((y - a) ** 2 + (x - b) ** 2 < max(v, r) ** 2 for a, b, r in accepted):
            continue
        accepted.append((y, x, v))
    found = []
    for y, x, v in accepted:
        margin = 0.75 * v  # a disc the border cuts would fake a larger radius
        if y < margin or x < margin or h - 1 - y < margin or w - 1 - x < margin:
            continue
        r = 1.3 * v
        y0, y1, x0, x1 = int(max(0, y - r)), int(min(h, y + r + 1)), int(max(0, x - r)), int(min(w, x + r + 1))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        if nucleus[y0:y1, x0:x1][disc].mean() > 0.01:  # the leukocyte, or a cell touching it
            continue
        found.append((float(y), float(x), v))
    if not found:
        return []
    # the inscribed radius is the smallest; rays from the centre give the mean radius
    found = [(y, x, _ray_radius(cells, y, x, v)) for y, x, v in found]
    radii = np.array([f[2] for f in found])
    return [f for f, k in zip(found, _population(radii)) if k]


def _ray_radius(cells: np.ndarray, y: float, x: float, v: float, n_rays: int = 24) -> float:
    """Median distance from ``(y, x)`` to the cell's edge along ``n_rays`` rays.

    Rays that leave the image, or run on past 1.6 x the inscribed radius ``v`` (into a
    touching cell), are dropped; with fewer than a third left, the inscribed radius
    plus half a pixel is returned.
    """
    h, w = cells.shape
    ang = np.arange(n_rays) * (2 * np.pi / n_rays)
    t = np.arange(0.8 * v, 1.6 * v, 0.5)
    ys = np.rint(y + np.sin(ang)[:, None] * t[None, :]).astype(int)
    xs = np.rint(x + np.cos(ang)[:, None] * t[None, :]).astype(int)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    on = np.zeros_like(inside)
    on[inside] = cells[ys[inside], xs[inside]]
    off = ~on & inside                       # first background sample along each ray
    first = np.where(off.any(1), off.argmax(1), -1)
    left = (~inside).any(1) & ((first < 0) | ((~inside).argmax(1) < first))
    ok = (first >= 0) & ~left
    if ok.sum() < n_rays / 3:
        return v + 0.5
    # the edge lies between the last cell sample and the first background one, and a sample
    # counts as cell while its nearest pixel does: the first background sample is ~half a pixel out
    return float(np.median(t[first[ok]])) - 0.5


def _population(radii: np.ndarray) -> np.ndarray:
    """Mask of radii within ±30% of the area-weighted median (the red cells, not debris)."""
    order = np.argsort(radii)
    cw = np.cumsum(radii[order] ** 2)
    med = radii[order][min(len(order) - 1, int(np.searchsorted(cw, cw[-1] / 2)))]
    return (radii > 0.7 * med) & (radii < 1.3 * med)


def _diameters(radii) -> np.ndarray:
    return 2.0 * np.asarray(radii, dtype=np.float64)


def _judge(diams: np.ndarray, n_images: int, rbc_diameter_um: float, min_rbc: int) -> ScaleEstimate:
    if len(diams) == 0:
        return ScaleEstimate(float("nan"), float("nan"), 0, False, "no red blood cells found", n_images)
    d = float(np.median(diams))
    um = rbc_diameter_um / d
    q1, q3 = np.percentile(diams, [25, 75])
    est = ScaleEstimate(um, d, int(len(diams)), True, "", n_images, float((q3 - q1) / d))
    lo, hi = PLAUSIBLE_UM_PER_PX
    if len(diams) < min_rbc:
        est.plausible, est.reason = False, f"rests on {len(diams)} red cell(s), fewer than {min_rbc}"
    elif not lo <= um <= hi:
        est.plausible, est.reason = False, f"{um:.4f} µm/px is outside the plausible {lo}-{hi} µm/px"
    return est


def estimate_scale(img: np.ndarray, *, rbc_diameter_um: float = RBC_DIAMETER_UM,
                   min_rbc: int = MIN_RBC) -> ScaleEstimate:
    """µm/px of one RGB uint8 image from its red cells, with the count it rests on."""
    return _judge(_diameters([r for _, _, r in find_rbcs(img)]), 1, rbc_diameter_um, min_rbc)


def estimate_um_per_px(img: np.ndarray, *, rbc_diameter_um: float = RBC_DIAMETER_UM) -> float:
    """µm/px of one image from its red cells; NaN when none is found (no plausibility check).

    >>> estimate_um_per_px(lmu_crop)              # doctest: +SKIP
    0.0709
    """
    return estimate_scale(img, rbc_diameter_um=rbc_diameter_um, min_rbc=1).um_per_px


#: A field's nucleus stain for the red-cell ruler: this much bluer (CIELAB b*) than the background and
#: at least this fraction of the field in one piece (a leukocyte nucleus, not the bluish rim of red cells).
FIELD_NUCLEUS_DB = 20.0
FIELD_NUCLEUS_MIN_FRAC = 0.003


def field_rbc_diameters(img: np.ndarray) -> np.ndarray:
    """Diameters (px, in ``img``'s pixels) of the red cells of a smear *field* (see :func:`estimate_field_scale`)."""
    img = np.asarray(img)
    f = max(1, int(max(img.shape[:2]) // 800))
    small = downsample(img, f)
    if small.shape[0] < 16 or small.shape[1] < 16:
        return np.zeros(0)
    lab = to_lab(small)
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    bright = L >= np.percentile(L, 80)
    bg_L, bg_a, bg_b = (float(np.median(ch[bright])) for ch in (L, a, b))
    # red cells: darker or redder than background, and not blue (nuclei, platelets)
    rbc = ((bg_L - L > 4) | (a - bg_a > 4)) & (bg_b - b < 12)
    rbc = ndi.binary_opening(rbc, iterations=1)
    rbc = ndi.binary_fill_holes(rbc)
    rbc = remove_small(rbc, 20)
    frac = rbc.mean()
    if frac < 0.02 or frac > 0.97:
        return np.zeros(0)
    dist = ndi.distance_transform_edt(rbc)
    peaks = peak_local_max(dist, min_distance=3, threshold_abs=3, exclude_border=True)
    if len(peaks) == 0:
        return np.zeros(0)
    # a leukocyte's cytoplasm (and red cells touching it) merge into one large "cell": drop peaks whose
    # disc (enlarged by 30%) reaches a nucleus
    nuc = remove_small(ndi.binary_opening((bg_b - b) >= FIELD_NUCLEUS_DB, iterations=2),
                       FIELD_NUCLEUS_MIN_FRAC * L.size)
    r = dist[peaks[:, 0], peaks[:, 1]]
    if nuc.any():
        keep = ndi.distance_transform_edt(~nuc)[peaks[:, 0], peaks[:, 1]] > 1.3 * r
        peaks, r = peaks[keep], r[keep]
    accepted: list[tuple[int, int, float]] = []
    h, w = rbc.shape
    for i in np.argsort(-r, kind="stable"):  # one peak per cell, largest disc first
        y, x, v = int(peaks[i, 0]), int(peaks[i, 1]), float(r[i])
        if any((y - p) ** 2 + (x - q) ** 2 < max(v, rp) ** 2 for p, q, rp in accepted):
            continue
        if min(y, x, h - 1 - y, w - 1 - x) < 0.75 * v:  # a disc the border cuts
            continue
        accepted.append((y, x, v))
    if not accepted:
        return np.zeros(0)
    radii = np.array([_ray_radius(rbc, y, x, v) for y, x, v in accepted])
    return 2.0 * radii[_mode_population(radii)] * f


def _mode_population(radii: np.ndarray) -> np.ndarray:
    """Mask of radii within ±30% of the area-weighted mode (log scale): the red cells, not the clumps."""
    lr = np.log(np.maximum(radii, 1e-6))
    edges = np.arange(lr.min(), lr.max() + 0.1, 0.05)
    hist, edges = np.histogram(lr, bins=edges, weights=radii ** 2)
    k = int(np.convolve(hist, [1, 2, 3, 2, 1], "same").argmax())
    mode = math.exp(0.5 * (edges[k] + edges[k + 1]))
    return (radii > 0.7 * mode) & (radii < 1.3 * mode)


def estimate_field_scale(img: np.ndarray, *, rbc_diameter_um: float = RBC_DIAMETER_UM,
                         min_rbc: int = 5) -> ScaleEstimate:
    """µm/px of a smear *field* (many red cells, often touching) from its red cells.

    :func:`estimate_scale` is made for single-cell crops (a few red cells around a
    leukocyte, nuclei excluded, radius by rays); in a whole field, where red cells
    pack and touch, it finds too few isolated cells (on BCCD's 640x480 fields it
    fails on about half). This method, used by the screener, takes the red-cell mask
    in CIELAB (darker or redder than the background and not blue), fills the central
    pallor, finds each cell's centre at a peak of its distance transform (one per cell,
    largest first), drops peaks whose disc reaches a leukocyte nucleus (its pink cytoplasm
    would pass for one giant red cell: BCCD ``BloodImage_00000`` read 238 px "red cells" so)
    or is cut by the border, measures each radius by rays (:func:`_ray_radius`), and keeps
    the red-cell population: radii within ±30% of the area-weighted mode (clumps whose
    filled gaps fake large cells are rare, so they do not move the mode). The field is
    analysed at most ~800 px across. A field is noisy (BCCD: about ±20% per field against
    the boxes); fields of one scan or folder are pooled by :func:`pool_field_scales`.
    """
    d = field_rbc_diameters(img)
    if len(d) == 0:
        return ScaleEstimate(float("nan"), float("nan"), 0, False, "no measurable red cells in the field")
    return _judge(d, 1, rbc_diameter_um, min_rbc)


@dataclass
class PooledScale:
    """One µm/px for the fields of one scan, folder or source, and how far the fields agree.

    ``estimate``: the pooled :class:`ScaleEstimate` (median over all red cells of all fields);
    ``field_um_per_px``: each field's own estimate (NaN where it failed); ``spread``:
    ``{"median", "iqr", "mad"}`` of the plausible per-field estimates (µm/px), ``n_fields_measured``.
    """

    estimate: ScaleEstimate
    field_um_per_px: list
    spread: dict

    def to_dict(self) -> dict:
        return {"estimate": self.estimate.to_dict(), "field_um_per_px": [_none_if_nan(v) for v in self.field_um_per_px],
                "spread": self.spread}


def _none_if_nan(v):
    return None if v is None or not np.isfinite(v) else float(v)


def pool_field_scales(diameters: Sequence[np.ndarray], *, rbc_diameter_um: float = RBC_DIAMETER_UM,
                      min_rbc: int = 5) -> PooledScale:
    """Pool the red-cell diameters (px) of several fields of one optical scale (:func:`field_rbc_diameters`).

    The pooled scale is ``rbc_diameter_um / median(all diameters)``; each field's own estimate
    (fewer than ``min_rbc`` cells: NaN) and their spread are kept for the tolerance check
    (:func:`leukoscope.imaging.scale_policy.ScalePolicy.resolve_fields`).
    """
    per_field = [_judge(np.asarray(d, float), 1, rbc_diameter_um, min_rbc) for d in diameters]
    fields = [e.um_per_px if e.plausible else float("nan") for e in per_field]
    alld = np.concatenate([np.asarray(d, float) for d in diameters]) if len(diameters) else np.zeros(0)
    pooled = _judge(alld, len(diameters), rbc_diameter_um, min_rbc)
    ok = np.array([v for v in fields if np.isfinite(v)])
    spread = {"n_fields": len(fields), "n_fields_measured": int(len(ok)), "n_rbc": int(len(alld)),
              "median": _none_if_nan(np.median(ok)) if len(ok) else None,
              "iqr": _none_if_nan(np.subtract(*np.percentile(ok, [75, 25]))) if len(ok) else None,
              "mad": _none_if_nan(np.median(np.abs(ok - np.median(ok)))) if len(ok) else None}
    return PooledScale(pooled, fields, spread)


def estimate_dataset_scale(images: Sequence, *, max_images: int = 40, seed: int = 0,
                           rbc_diameter_um: float = RBC_DIAMETER_UM, min_rbc: int = MIN_RBC) -> ScaleEstimate:
    """One µm/px for a set of images of the same source (paths or arrays).

    Up to ``max_images`` images are drawn at random (``seed``); red cells of every
    image are pooled and their median diameter gives the scale, which is far steadier
    than one crop's two or three cells. Unreadable images are skipped.
    """
    items = list(images)
    if len(items) > max_images:
        pick = np.random.default_rng(seed).choice(len(items), max_images, replace=False)
        items = [items[i] for i in sorted(pick)]
    diams, used = [], 0
    for item in items:
        try:
            img = load_rgb(item) if isinstance(item, (str, os.PathLike)) else np.asarray(item)
        except ImageError:
            continue
        used += 1
        diams.extend(_diameters([r for _, _, r in find_rbcs(img)]))
    return _judge(np.asarray(diams), used, rbc_diameter_um, min_rbc)


@dataclass
class ResolvedScale:
    """Per-image µm/px for a table and where each value came from."""

    um_per_px: np.ndarray                     # NaN where unknown (the model then resizes)
    origin: np.ndarray                        # "user" | "table" | "estimated" | "unknown"
    estimates: dict = field(default_factory=dict)   # group -> ScaleEstimate.to_dict()
    warnings: list = field(default_factory=list)


def resolve_um_per_px(table, *, user_um_per_px: float | None = None, estimate: str = "group",
                      group_col: str = "source", max_images: int = 40, seed: int = 0,
                      fallback: float | None = None) -> ResolvedScale:
    """µm/px for each row of a dataset table: the user's, else the table's, else estimated.

    ``estimate``: ``"group"`` pools red cells over up to ``max_images`` images of each
    ``group_col`` group whose scale is unknown (one value per source); ``"image"``
    estimates every image on its own (falls back to the group's value when an image has
    too few red cells); ``"off"`` leaves unknown scales unknown. An implausible estimate
    is not used: the row gets ``fallback`` (or stays unknown, i.e. resized to the model
    input) and a warning says so.
    """
    n = len(table)
    out = np.full(n, np.nan)
    origin = np.array(["unknown"] * n, dtype=object)
    res = ResolvedScale(out, origin)
    if user_um_per_px is not None:
        if not (user_um_per_px > 0 and math.isfinite(user_um_per_px)):
            raise ValueError(f"--um-per-px must be a positive number, got {user_um_per_px}")
        out[:] = float(user_um_per_px)
        origin[:] = "user"
        return res
    if estimate not in ("group", "image", "off"):
        raise ValueError(f"estimate must be 'group', 'image' or 'off', got {estimate!r}")
    stated = pd.to_numeric(table["um_per_px"], errors="coerce").to_numpy(float) if "um_per_px" in table else out.copy()
    known = np.isfinite(stated) & (stated > 0)
    out[known] = stated[known]
    origin[known] = "table"
    if estimate == "off" or known.all():
        return res
    groups = table[group_col].astype(str).to_numpy() if group_col in table else np.array(["all"] * n)
    paths = table["path"].astype(str).to_numpy()
    for g in pd.unique(groups[~known]):
        rows = np.flatnonzero((groups == g) & ~known)
        est = estimate_dataset_scale(list(paths[rows]), max_images=max_images, seed=seed)
        res.estimates[str(g)] = est.to_dict()
        if est.plausible:
            out[rows] = est.um_per_px
            origin[rows] = "estimated"
        else:
            fb = "the dataset default of %.4g µm/px" % fallback if fallback else "no rescaling (resized to the model input)"
            res.warnings.append(f"scale of {group_col} {g!r}: red-cell estimate not usable ({est.reason}); "
                                f"using {fb}")
            if fallback:
                out[rows] = float(fallback)
                origin[rows] = "fallback"
            continue
        if estimate == "image":
            for i in rows:
                try:

                    e = estimate_scale(load_rgb(paths[i]))
                except Exception:  # unreadable here: the group value stays
                    continue
                if e.plausible:
                    out[i] = e.um_per_px
    for w in res.warnings:
        warnings.warn(w, RuntimeWarning, stacklevel=2)
    return res


def scale_report(paths_by_source: dict[str, Iterable], max_images: int = 40, seed: int = 0) -> dict:
    """``{source: ScaleEstimate.to_dict()}``: what the red-cell ruler says about each source."""
    return {k: estimate_dataset_scale(list(v), max_images=max_images, seed=seed).to_dict()
            for k, v in paths_by_source.items()}
