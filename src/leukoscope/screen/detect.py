"""Finding leukocytes in a smear field by colour, morphology and watershed.

In a May-Grünwald-Giemsa (or Wright) smear the leukocyte nuclei are the only large
objects that are strongly *blue-violet*; red cells are pink and have no nucleus, the
background is pale, and platelets are small violet dots. The detector works in
CIELAB, where "blue" is a negative ``b*``:

1. Bring the field to a working scale of about :attr:`DetectParams.work_um_per_px`
   by an *integer* block mean (so that overlapping tiles of a scan see exactly the
   same working pixels).
2. Measure the background (the brightest pixels) once per smear
   (:func:`calibrate`), and call a pixel *nucleus* where it is at least
   ``nucleus_db`` bluer than the background, *cytoplasm* where it is at least
   ``cyto_db`` bluer and not as red as a red cell.
3. Join the lobes of a segmented nucleus (closing by ``lobe_join_um``), drop objects
   smaller than ``min_nucleus_um2`` (platelets), and split touching nuclei by a
   watershed on the distance transform seeded from its h-maxima.
4. Grow each nucleus into its cytoplasm (at most ``cyto_reach_um``, never into a
   neighbour's) and box nucleus + cytoplasm.

Every size is a physical one (µm, µm²), so the same parameters work at 0.07 and at
0.25 µm/px.

For scans, :func:`detect_leukocytes_fast` gives the same cells for a fraction of the
work: it looks for candidate nuclei at :data:`COARSE_FACTOR` times the working pixel
size with a relaxed threshold, and runs :func:`detect_leukocytes` itself (the same
settings) only on windows around the candidates, each with a margin wide enough
(:func:`refine_margin_um`) that every filter sees what it sees on the whole field. :func:`leukoscope.imaging.scale_estimate.estimate_field_scale` measures the scale
of a field from its red cells (median diameter ≈ 7.5 µm) when a file does not say it.

>>> import numpy as np
>>> field = np.full((200, 200, 3), 235, np.uint8)
>>> detect_leukocytes(field, um_per_px=0.1).empty
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from skimage.filters import gaussian
from skimage.measure import regionprops
from skimage.morphology import disk, h_maxima
from skimage.segmentation import watershed

from leukoscope.imaging.morphology import downsample, remove_small, to_lab
from leukoscope.imaging.scale_policy import check_um_per_px

#: Columns of a detection table.
DETECTION_COLUMNS = ["x0", "y0", "x1", "y1", "cx", "cy", "nucleus_um2", "cell_um2", "blue"]


@dataclass(frozen=True)
class DetectParams:
    """Detector settings, all in physical units (µm, µm²) or CIELAB units.

    ``nucleus_db``, ``min_nucleus_um2``, ``cyto_reach_um`` and ``split_h_um`` were chosen
    by 5-fold cross-validation over the 292 visible BCCD fields (``benchmarks/detect_cv.py``:
    highest F1 at IoU >= 0.5 on the training folds, then on all fields): held-out recall
    0.983, precision 0.977 at 0.0721 µm/px (benchmarks/README.md). ``box_margin_um``
    stays 1 µm (BCCD's boxes would prefer 0, touching synthetic cells need 1); the other
    settings are the hand-set ones of issue 6.
    """

    work_um_per_px: float = 0.2      # analysis scale
    nucleus_db: float = 22.0         # nucleus: b* this much below (bluer than) the background
    cyto_db: float = 5.0             # cytoplasm: smoothed b* this much below the background
    cyto_over_rbc: float = 5.0       # ... and this much bluer than the red cells
    cyto_smooth_um: float = 0.8      # smoothing of the cytoplasm map (red-cell rims are thin)
    cyto_open_um: float = 1.0        # opening of the cytoplasm mask (removes rims and wisps)
    min_nucleus_um2: float = 22.0    # smaller violet objects are platelets (cross-validated)
    max_cell_um: float = 30.0        # no leukocyte is wider; also the tile overlap
    lobe_join_um: float = 2.0        # lobes of one nucleus closer than this are one nucleus
    split_min_um: float = 6.5        # ... whose centres are at least this far apart
    split_h_um: float = 2.0          # touching nuclei: saddle depth of the distance map
    cyto_reach_um: float = 3.5       # cytoplasm reaches at most this far beyond the nucleus (cross-validated)
    box_margin_um: float = 1.0       # added on each side of the box
    smooth_um: float = 0.3           # Gaussian smoothing before thresholds

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StainCalibration:
    """Background colour of a smear in CIELAB (``L*``, ``a*``, ``b*``)."""

    bg_L: float
    bg_a: float
    bg_b: float
    rbc_db: float = 0.0  # how much bluer than the background red cells are (75th percentile)

    def to_dict(self) -> dict:
        return asdict(self)


def work_factor(um_per_px: float, params: DetectParams = DetectParams()) -> int:
    """Integer block size that brings ``um_per_px`` closest to the working scale (at least 1)."""
    return max(1, int(round(params.work_um_per_px / float(um_per_px))))


def calibrate(img: np.ndarray, um_per_px: float | None = None, params: DetectParams = DetectParams()) -> StainCalibration:
    """Background colour of a field: the median colour of its brightest fifth.

    For a scan, call it on an overview or a few sampled tiles and pass the result to
    every tile, so that all tiles use the same thresholds.
    """
    f = work_factor(um_per_px, params) if um_per_px else max(1, min(img.shape[:2]) // 512)
    lab = to_lab(downsample(img, f))
    if lab.size == 0:
        raise ValueError("image too small to calibrate")
    L, b = lab[..., 0].ravel(), lab[..., 2].ravel()
    bright = L >= np.percentile(L, 80)
    bg_L, bg_b = float(np.median(L[bright])), float(np.median(b[bright]))
    db = bg_b - b
    red = (bg_L - L > 5) & (db < params.nucleus_db / 2)  # red cells (and cytoplasm, a few pixels)
    rbc_db = float(np.percentile(db[red], 75)) if red.sum() > 100 else 0.0
    return StainCalibration(bg_L, float(np.median(lab[..., 1].ravel()[bright])), bg_b, max(0.0, rbc_db))


def _disk(r: float):
    return disk(max(0, int(round(r))))


def detect_leukocytes(img: np.ndarray, um_per_px: float, params: DetectParams = DetectParams(),
                      calibration: StainCalibration | None = None, offset: tuple[int, int] = (0, 0)) -> pd.DataFrame:
    """Leukocytes in an RGB field: one row per cell, boxes in source pixels.

    ``offset`` (x, y) is added to all coordinates (the tile's origin in the scan);
    the block grid is aligned to the image origin when the offset is a multiple of the
    block factor (:func:`leukoscope.screen.tiles.tile_grid` makes sure of that).
    Columns: ``x0, y0, x1, y1`` (x1/y1 exclusive), ``cx, cy`` (box centre),
    ``nucleus_um2``, ``cell_um2`` and ``blue`` (mean nucleus ``b*`` below background).
    It is :func:`prepare_field` followed by :func:`detect_prepared`.
    """
    prep = prepare_field(img, um_per_px, params, calibration)
    if prep is None:
        return _empty()
    return detect_prepared(prep, params, offset)


@dataclass(frozen=True)
class PreparedField:
    """A field at the working scale: its blueness map and what is needed to map boxes back.

    ``db`` is the smoothed ``b*`` below the background (> 0: bluer), per working pixel.
    A prepared field depends only on ``work_um_per_px``, ``smooth_um`` and (through
    :func:`calibrate`, unless a calibration is given) ``nucleus_db``, so it serves every
    setting of :class:`DetectParams` that shares those (the cross-validation in
    ``benchmarks/detect_cv.py`` relies on that).
    """

    db: np.ndarray
    factor: int                 # source pixels per working pixel
    um_per_px: float            # of the source image
    shape: tuple[int, int]      # source image (H, W)
    calibration: StainCalibration


def prepare_field(img: np.ndarray, um_per_px: float, params: DetectParams = DetectParams(),
                  calibration: StainCalibration | None = None) -> PreparedField | None:
    """Bring an RGB field to the working scale and measure its blueness (None: too small)."""
    um_per_px = check_um_per_px(um_per_px)
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    f = work_factor(um_per_px, params)
    wum = f * um_per_px  # µm per working pixel
    small = downsample(img, f)
    if small.shape[0] < 4 or small.shape[1] < 4:
        return None
    cal = calibration or calibrate(img, um_per_px, params)
    lab = to_lab(gaussian(small, sigma=params.smooth_um / wum, channel_axis=-1, preserve_range=True))
    return PreparedField(cal.bg_b - lab[..., 2], f, um_per_px, img.shape[:2], cal)


def detect_prepared(prep: PreparedField, params: DetectParams = DetectParams(),
                    offset: tuple[int, int] = (0, 0)) -> pd.DataFrame:
    """Segment and box the leukocytes of a :func:`prepare_field` result (see :func:`detect_leukocytes`)."""
    db, f, um_per_px, cal = prep.db, prep.factor, prep.um_per_px, prep.calibration
    wum = f * um_per_px
    px2 = wum * wum
    nuc = remove_small(db >= params.nucleus_db, params.min_nucleus_um2 / 4 / px2)
    if not nuc.any():
        return _empty()
    # cytoplasm: bluish after smoothing and opening (red-cell rims are thin and vanish), near a nucleus
    cyto_t = max(params.cyto_db, cal.rbc_db + params.cyto_over_rbc)
    cyto_any = gaussian(db, sigma=params.cyto_smooth_um / wum, preserve_range=True) >= cyto_t
    nuc, cyto = _near_nuclei(nuc, cyto_any, params, wum)
    cell = remove_small(ndi.binary_fill_holes(nuc | cyto), params.min_nucleus_um2 / px2)

    # split touching cells: watershed on the distance map of the cell mask from its h-maxima
    # (a cell is round: one peak; two touching cells leave a saddle between two peaks)
    dist = ndi.distance_transform_edt(cell)
    markers = _h_maxima_markers(dist, cell, max(1.0, params.split_h_um / wum))
    markers = _merge_close_markers(markers, params.split_min_um / wum)
    cell_lab = watershed(-dist, markers, mask=cell)
    nuc_lab = np.where(nuc, cell_lab, 0)

    H, W = prep.shape
    margin = params.box_margin_um / um_per_px
    ox, oy = offset
    rows = []
    for rp in regionprops(cell_lab):
        nuc_area = float(np.count_nonzero(nuc_lab[rp.slice] == rp.label)) * px2
        if nuc_area < params.min_nucleus_um2:
            continue
        r0, c0, r1, c1 = rp.bbox
        if max(r1 - r0, c1 - c0) * wum > params.max_cell_um * 1.25:
            continue  # a clump or debris, not one cell
        blue = float(db[rp.slice][nuc_lab[rp.slice] == rp.label].mean())
        x0 = max(0.0, c0 * f - margin)
        y0 = max(0.0, r0 * f - margin)
        x1 = min(float(W), c1 * f + margin)
        y1 = min(float(H), r1 * f + margin)
        rows.append((int(round(x0)) + ox, int(round(y0)) + oy, int(round(x1)) + ox, int(round(y1)) + oy,
                     (x0 + x1) / 2 + ox, (y0 + y1) / 2 + oy, nuc_area, float(rp.area) * px2, blue))
    if not rows:
        return _empty()
    return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


#: Candidates are looked for at this many times the working pixel size (a block mean).
COARSE_FACTOR = 2
#: ... where a pixel is a candidate when it is this fraction of ``nucleus_db`` bluer than the
#: background (a block mean dilutes the edge of a nucleus with its surroundings) ...
COARSE_RELAX = 0.9
#: ... and a candidate (its lobes within ``lobe_join_um`` joined) covers at least this fraction of
#: ``min_nucleus_um2`` (platelets, far smaller, are mostly left out; they would only cost time).
COARSE_MIN_AREA = 0.5
#: Windows are refined one by one while they cover less than this fraction of the field,
#: else the whole field is analysed at once (little saving left to make).
WINDOW_FRACTION = 0.6
#: Fields of fewer pixels are analysed whole (a camera field: the candidate search would cost more
#: than it saves).
SMALL_FIELD_PX = 1_500_000


def refine_margin_um(params: DetectParams = DetectParams()) -> float:
    """Margin (µm) around a candidate within which :func:`detect_leukocytes` sees the field as a whole.

    A cell reaches ``cyto_reach_um`` (+ the box margin) beyond its nucleus; what decides its pixels
    lies within the opening (twice ``cyto_open_um``) and the Gaussian supports (4 sigma) of it; two
    coarse pixels cover a nucleus edge the coarse threshold missed. (The closing of the nucleus stays
    inside the nucleus' own box.)
    """
    coarse = 2 * COARSE_FACTOR * params.work_um_per_px
    return (params.cyto_reach_um + params.box_margin_um + 2 * params.cyto_open_um + 4 * params.cyto_smooth_um
            + 4 * params.smooth_um + coarse)


def _keep_um(params: DetectParams) -> float:
    """How far (µm) beyond its candidate's box a cell's box centre can lie."""
    return params.cyto_reach_um + params.box_margin_um + 2 * COARSE_FACTOR * params.work_um_per_px


def candidate_windows(img: np.ndarray, um_per_px: float, params: DetectParams = DetectParams(),
                      calibration: StainCalibration | None = None, within: tuple[int, int, int, int] | None = None
                      ) -> list[tuple[tuple[int, int, int, int], list[tuple[int, int, int, int]]]]:
    """Windows of ``img`` that may hold leukocytes: ``[(window, candidate_boxes), ...]``, boxes (y0, x0, y1, x1) px.

    Candidate nuclei are found at ``COARSE_FACTOR`` x the working scale (:data:`COARSE_RELAX`,
    :data:`COARSE_MIN_AREA`). A cell lies within :func:`_keep_um` of its candidate's box, so
    candidates closer than twice that may interact (touching cells split by the watershed) and form
    one group; farther ones cannot. A group's window is the box of its candidates grown by
    :func:`refine_margin_um`, its origin a multiple of the detector's block factor (the same working
    pixel grid as the whole field). Windows of two groups may overlap (a window may show part of
    another group), their cells never. With ``within`` (y0, x0, y1, x1 in ``img`` px), only candidates that could have
    their cell's centre in that region are kept.
    """
    um_per_px = check_um_per_px(um_per_px)
    f = work_factor(um_per_px, params)
    big = f * COARSE_FACTOR
    h, w = img.shape[:2]
    coarse = downsample(img, big)
    if coarse.shape[0] < 2 or coarse.shape[1] < 2:
        return [((0, 0, h, w), [(0, 0, h, w)])] if min(h, w) > 0 else []
    cal = calibration or calibrate(img, um_per_px, params)
    cum = big * um_per_px  # µm per coarse pixel
    mask = cal.bg_b - to_lab(coarse)[..., 2] >= params.nucleus_db * COARSE_RELAX
    if not mask.any():
        return []
    joined = ndi.binary_dilation(mask, _disk(params.lobe_join_um / cum)) if params.lobe_join_um > 0 else mask
    comp, n = ndi.label(joined, structure=np.ones((3, 3)))
    area = np.bincount(comp[mask], minlength=n + 1) * cum * cum
    m = int(math.ceil(refine_margin_um(params) / um_per_px))
    keep = _keep_um(params) / um_per_px
    cands = []
    for i, sl in enumerate(ndi.find_objects(comp), start=1):
        if sl is None or area[i] < COARSE_MIN_AREA * params.min_nucleus_um2:
            continue
        box = (sl[0].start * big, sl[1].start * big, min(h, sl[0].stop * big), min(w, sl[1].stop * big))
        if within is not None and (box[2] + keep < within[0] or box[3] + keep < within[1]
                                   or box[0] - keep > within[2] or box[1] - keep > within[3]):
            continue
        cands.append(box)
    out = []
    for group in _groups(cands, int(math.ceil(2 * keep))):
        y0 = max(0, (min(b[0] for b in group) - m) // f * f)
        x0 = max(0, (min(b[1] for b in group) - m) // f * f)
        y1 = min(h, max(b[2] for b in group) + m)
        x1 = min(w, max(b[3] for b in group) + m)
        out.append(((y0, x0, y1, x1), group))
    return out


def _groups(boxes: list[tuple[int, int, int, int]], gap: int, keys: list | None = None) -> list[list]:
    """Boxes (y0, x0, y1, x1) joined into groups: two boxes less than ``gap`` apart (on both axes) share one.

    With ``keys``, a group lists ``(box, key)`` pairs."""
    parent = list(range(len(boxes)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(boxes):
        for j in range(i):
            b = boxes[j]
            if a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap:
                parent[root(i)] = root(j)
    groups: dict[int, list] = {}
    for i, b in enumerate(boxes):
        groups.setdefault(root(i), []).append(b if keys is None else (b, keys[i]))
    return list(groups.values())


def detect_leukocytes_fast(img: np.ndarray, um_per_px: float, params: DetectParams = DetectParams(),
                           calibration: StainCalibration | None = None, offset: tuple[int, int] = (0, 0),
                           within: tuple[int, int, int, int] | None = None) -> pd.DataFrame:
    """:func:`detect_leukocytes` (same settings, same columns) run only around candidate nuclei.

    Candidates come from :func:`candidate_windows` (``within``: see there); each window is analysed
    by :func:`detect_leukocytes` itself, so a cell is found as on the whole field, and keeps the
    cells whose centre lies near its own candidates. A field of fewer than :data:`SMALL_FIELD_PX`
    pixels, or one whose windows would cover more than :data:`WINDOW_FRACTION` of it, is analysed
    at once.
    """
    um_per_px = check_um_per_px(um_per_px)
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    cal = calibration or calibrate(img, um_per_px, params)
    if img.shape[0] * img.shape[1] < SMALL_FIELD_PX:
        return detect_leukocytes(img, um_per_px, params, calibration=cal, offset=offset)
    windows = candidate_windows(img, um_per_px, params, cal, within)
    h, w = img.shape[:2]
    if sum((y1 - y0) * (x1 - x0) for (y0, x0, y1, x1), _ in windows) > WINDOW_FRACTION * h * w:
        return detect_leukocytes(img, um_per_px, params, calibration=cal, offset=offset)
    ox, oy = offset
    keep = _keep_um(params) / um_per_px
    frames = []
    for (y0, x0, y1, x1), cands in windows:
        det = detect_leukocytes(img[y0:y1, x0:x1], um_per_px, params, calibration=cal, offset=(ox + x0, oy + y0))
        if det.empty:
            continue
        cx, cy = det.cx.to_numpy() - ox, det.cy.to_numpy() - oy
        own = np.zeros(len(det), bool)
        for by0, bx0, by1, bx1 in cands:
            own |= (cx >= bx0 - keep) & (cx < bx1 + keep) & (cy >= by0 - keep) & (cy < by1 + keep)
        if own.any():
            frames.append(det[own])
    if not frames:
        return _empty()
    return pd.concat(frames, ignore_index=True).sort_values(["y0", "x0"], kind="stable").reset_index(drop=True)


def _near_nuclei(nuc: np.ndarray, cyto_any: np.ndarray, params: DetectParams, wum: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The nucleus mask with the lobes of a nucleus joined (a closing by ``lobe_join_um``, the field
    zero-padded), and the cytoplasm: ``cyto_any`` opened by ``cyto_open_um`` within ``cyto_reach_um``
    of a nucleus.

    Both change pixels only near a nucleus, so they are computed on boxes around groups of nuclei,
    not over the whole field; the result is the same as over the whole field: nuclei more than
    twice the closing radius apart close independently, every box reaches ``cyto_reach_um`` plus
    the opening's support beyond its own nuclei, and a pixel's distance to the nearest nucleus is
    the least over the groups.
    """
    h, w = nuc.shape
    rc = int(round(params.lobe_join_um / wum)) if params.lobe_join_um > 0 else 0
    ro = int(round(params.cyto_open_um / wum))
    reach = params.cyto_reach_um / wum
    grow = int(math.ceil(reach)) + 2 * ro + 2
    comp, _ = ndi.label(nuc)
    objs = ndi.find_objects(comp)
    boxes = [(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop, i) for i, sl in enumerate(objs, start=1)
             if sl is not None]
    closed = np.zeros_like(nuc)
    groups = []
    for group in _groups([b[:4] for b in boxes], 2 * rc + 2, keys=[b[4] for b in boxes]):
        by0, bx0 = min(b[0] for b, _ in group), min(b[1] for b, _ in group)
        by1, bx1 = max(b[2] for b, _ in group), max(b[3] for b, _ in group)
        labels = [k for _, k in group]
        y0, x0, y1, x1 = max(0, by0 - rc - 1), max(0, bx0 - rc - 1), min(h, by1 + rc + 1), min(w, bx1 + rc + 1)
        sub = np.isin(comp[y0:y1, x0:x1], labels)
        if rc > 0:  # join the lobes of a segmented nucleus
            pad = rc + 1
            sub = ndi.binary_closing(np.pad(sub, pad), _disk(rc))[pad:-pad, pad:-pad]
        closed[y0:y1, x0:x1] |= sub
        groups.append(((y0, x0, y1, x1), sub))
    cyto = np.zeros_like(nuc)
    for (y0, x0, y1, x1), sub in groups:
        Y0, X0, Y1, X1 = max(0, y0 - grow), max(0, x0 - grow), min(h, y1 + grow), min(w, x1 + grow)
        own = np.zeros((Y1 - Y0, X1 - X0), bool)
        own[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0] = sub
        zone = ndi.distance_transform_edt(~own) <= reach
        cyto[Y0:Y1, X0:X1] |= ndi.binary_opening(cyto_any[Y0:Y1, X0:X1], _disk(ro)) & zone
    return closed, cyto


def _h_maxima_markers(dist: np.ndarray, mask: np.ndarray, h: float) -> np.ndarray:
    """Labelled h-maxima of ``dist``, computed object by object (the background is most of a field)."""
    comp, n = ndi.label(mask)
    markers = np.zeros(dist.shape, np.int32)
    nxt = 1
    for i, sl in enumerate(ndi.find_objects(comp), start=1):
        if sl is None:
            continue
        sub = np.where(comp[sl] == i, dist[sl], 0.0)
        lab, k = ndi.label(h_maxima(np.pad(sub, 1), h)[1:-1, 1:-1] & (comp[sl] == i))
        markers[sl][lab > 0] = lab[lab > 0] + nxt - 1
        nxt += k
    return markers


def _merge_close_markers(markers: np.ndarray, min_dist: float) -> np.ndarray:
    """Give markers whose centroids are closer than ``min_dist`` (px) one label (single linkage)."""
    n = int(markers.max())
    if n < 2:
        return markers
    cents = np.asarray(ndi.center_of_mass(markers > 0, markers, range(1, n + 1)))
    groups = fcluster(linkage(cents, method="single"), t=min_dist, criterion="distance")
    lut = np.concatenate([[0], groups]).astype(markers.dtype)
    return lut[markers]


def _connected_to_seed(cell_lab: np.ndarray, seed_lab: np.ndarray) -> np.ndarray:
    """Keep, for every label, only the parts of its region connected to its seed."""
    comp, _ = ndi.label(cell_lab > 0)
    # a component is kept for label L if it touches L's seed; components are split by label
    key = comp.astype(np.int64) * (int(cell_lab.max()) + 1) + cell_lab
    seeded = np.unique(key[seed_lab > 0])
    return np.where(np.isin(key, seeded), cell_lab, 0)


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("x0", "y0", "x1", "y1") else "float64")
                         for c in DETECTION_COLUMNS})


# --------------------------------------------------------------------------- matching to ground truth


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``a`` (n, 4) and ``b`` (m, 4) given as x0, y0, x1, y1."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(pred, truth, iou: float = 0.5) -> tuple[int, int, int, np.ndarray]:
    """One-to-one matching (Hungarian on IoU) of predicted and true boxes.

    Returns ``(tp, fp, fn, ious)``: matches need IoU >= ``iou``; ``ious`` are the IoUs
    of the matched pairs.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    if len(pred) == 0 or len(truth) == 0:
        return 0, len(pred), len(truth), np.zeros(0)
    m = box_iou(pred, truth)
    rows, cols = linear_sum_assignment(-m)
    good = m[rows, cols] >= iou
    tp = int(good.sum())
    return tp, len(pred) - tp, len(truth) - tp, m[rows, cols][good]
