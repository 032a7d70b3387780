"""Drawing primitives shared by synthetic cells and smears.

Everything is drawn as *optical density* (absorbance, per RGB channel) in small local
stamps: a stained structure adds density, and the image is formed once at the end by
Beer-Lambert, ``rgb = white * exp(-density)``. Overlapping structures (a red cell under
a leukocyte's edge, granules over a nucleus) then mix the way stained layers do in
transmitted light, and nothing is ever drawn over the whole field per cell.

Geometry is given in micrometres by the callers and converted to pixels with the
image's µm/px, so the same cell can be drawn at 64 px or at 400 px.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

#: Colours of MGG-stained structures as optical density per unit (R, G, B), fitted by
#: eye and by k-means on the real LMU crops (background ~ (242, 238, 236)).
OD = {
    "nucleus": np.array([1.2, 2.8, 0.34], np.float32),        # purple-violet chromatin
    "nucleus_blast": np.array([0.78, 2.75, 0.22], np.float32),  # finer, more magenta
    "rbc": np.array([0.17, 0.33, 0.19], np.float32),            # pale pink-lilac
    "cyto_neutro": np.array([0.1, 0.25, 0.1], np.float32),  # pale pinkish lilac
    "cyto_lympho": np.array([0.36, 0.43, 0.11], np.float32),    # clear blue
    "cyto_blast": np.array([0.30, 0.38, 0.15], np.float32),     # grey-blue
    "cyto_mono": np.array([0.22, 0.29, 0.13], np.float32),      # grey-blue lilac
    "cyto_ery": np.array([0.52, 0.56, 0.20], np.float32),       # deep blue (polychromatic)
    "gran_eos": np.array([0.12, 0.5, 0.42], np.float32),       # orange-red
    "gran_baso": np.array([1.30, 2.30, 0.70], np.float32),      # dark purple-black
    "gran_azur": np.array([0.55, 1.45, 0.42], np.float32),      # red-purple
    "gran_neutro": np.array([0.10, 0.26, 0.09], np.float32),    # faint pink-lilac dust
    "auer": np.array([0.80, 1.90, 0.55], np.float32),           # red-purple needle
    "platelet": np.array([0.55, 0.95, 0.22], np.float32),       # purple
    "smudge": np.array([0.50, 1.25, 0.20], np.float32),         # smeared chromatin
}


def px(um: float, um_per_px: float) -> float:
    """Micrometres to pixels."""
    return um / um_per_px


def sigmoid_edge(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft mask from a signed distance (positive inside), edge ``width`` px (float32)."""
    w = max(float(width), 0.35)
    return (0.5 + 0.5 * np.tanh(signed / (2.0 * w))).astype(np.float32, copy=False)


def grid(half: int):
    """Pixel-centre coordinates ``(y, x)`` of a ``(2*half+1)`` square stamp, origin at its centre."""
    ax = np.arange(2 * half + 1, dtype=np.float32) - half
    return ax[:, None], ax[None, :]


def rotate(y: np.ndarray, x: np.ndarray, angle: float):
    """Coordinates in a frame rotated by ``angle`` radians (broadcast arrays)."""
    c, s = math.cos(angle), math.sin(angle)
    return c * y - s * x, s * y + c * x  # (v, u): v along the rotated y axis


def harmonics(rng: np.random.Generator, amplitude: float, kmin: int = 2, kmax: int = 6):
    """Random Fourier coefficients for a wobbly closed outline: ``[(k, a_k, phase_k)]``."""
    out = []
    for k in range(kmin, kmax + 1):
        out.append((k, float(amplitude * rng.normal() / math.sqrt(k - kmin + 1)), float(rng.uniform(0, 2 * math.pi))))
    return out


def polar_radius(phi: np.ndarray, r0: float, harm) -> np.ndarray:
    """Outline radius ``r(phi)``: ``r0`` times a Fourier wobble ``[(k, a_k, phase_k)]``."""
    r = np.ones_like(phi)
    for k, a, p in harm:
        r += a * np.cos(k * phi + p)
    return (r0 * np.maximum(r, 0.15)).astype(np.float32, copy=False)


def blob(y, x, r0: float, harm, *, aspect: float = 1.0, angle: float = 0.0, edge: float = 1.0,
         bite: float = 0.0, bite_radius: float = 0.7):
    """Soft mask of a polar-noise blob centred at the origin of ``(y, x)``.

    The blob is stretched by ``aspect`` along the direction ``angle`` (radians, as
    ``atan2(y, x)``). ``bite`` (0..0.6) cuts a disc of radius ``bite_radius * r0`` out
    of one long side, removing that fraction of the blob's width: the kidney or bean
    shape of monocytes and metamyelocytes and the notch of a myelocyte. The bite
    faces ``angle + pi/2``.

    Returns ``(mask, signed)`` where ``signed`` is (approximately) the distance inside
    the outline in px, positive inside.
    """
    v, u = rotate(y, x, angle)
    s = math.sqrt(aspect)
    u = u / s
    v = v * s
    rho = np.sqrt(u * u + v * v)
    signed = polar_radius(np.arctan2(v, u), r0, harm) - rho
    if bite > 0:
        rb = bite_radius * r0
        d = r0 + rb - bite * 2 * r0
        signed = np.minimum(signed, np.sqrt(u * u + (v - d) ** 2) - rb)
    return sigmoid_edge(signed, edge), signed


def arc_chain(y, x, *, radius: float, span: float, start: float, width: float, n_lobes: int,
              constriction: float, edge: float = 1.0, wobble=(), lobe_scale=None):
    """Soft mask of a nucleus drawn along a circular arc: a band, or lobes joined by strands.

    The centre line is the arc of ``radius`` px around the origin from angle ``start``
    over ``span`` radians; ``wobble`` gives Fourier terms ``(k, a, phase)`` for the arc
    radius along its length, so chains need not be perfect circles. With one lobe the
    nucleus is a band of half-width ``width`` px with round ends. With ``n_lobes`` > 1
    it is lobes (discs of radius ``width``) spread evenly from one end of the arc to
    the other, joined by a band of half-width ``(1 - constriction) * width``: 0 is an
    even band with bulges, ~0.9 thin chromatin strands (haematology calls a neutrophil
    segmented when the narrowest part is under a third of the widest). ``lobe_scale``
    (one factor per lobe) varies the lobes' sizes. Distances are computed only in the
    chain's bounding box.

    Returns ``(mask, signed)`` like :func:`blob` (``signed`` is -inf off the box).
    """
    yv, xv = np.ravel(y), np.ravel(x)
    reach = radius * (1 + sum(abs(a) for _, a, _ in wobble)) + width * (1.0 if lobe_scale is None else max(1.0, *lobe_scale)) + 4 * edge + 2
    ys = np.nonzero(np.abs(yv) <= reach)[0]
    xs = np.nonzero(np.abs(xv) <= reach)[0]
    signed_full = np.full((yv.size, xv.size), -np.inf, np.float32)
    if ys.size == 0 or xs.size == 0:
        return np.zeros_like(signed_full), signed_full
    yy = yv[ys[0]:ys[-1] + 1, None]
    xx = xv[None, xs[0]:xs[-1] + 1]

    def centre(t):
        ang = start + t * span
        rad = radius * np.ones_like(t)
        for k, a, p in wobble:
            rad = rad * (1.0 + a * np.cos(k * math.pi * t + p))
        return rad * np.sin(ang), rad * np.cos(ang)

    mid = start + span / 2
    rel = np.angle(np.exp(1j * (np.arctan2(yy, xx) - mid)))  # -pi..pi around the arc's middle
    cy, cx = centre(np.clip(rel / span + 0.5, 0.0, 1.0))  # nearest centre-line point (round ends)
    band = (1.0 - constriction) * width if n_lobes > 1 else width
    signed = band - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if n_lobes > 1:
        ly, lx = centre(np.linspace(0.0, 1.0, n_lobes))
        scale = np.ones(n_lobes) if lobe_scale is None else np.asarray(lobe_scale, float)
        for py, px_, f in zip(ly, lx, scale):
            signed = np.maximum(signed, width * f - np.sqrt((yy - py) ** 2 + (xx - px_) ** 2))
    signed_full[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] = signed
    return sigmoid_edge(signed_full, edge), signed_full


def segment_distance(y, x, p0, p1) -> np.ndarray:
    """Distance of each pixel to the segment ``p0``-``p1`` (points as ``(y, x)``)."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    ll = dy * dy + dx * dx
    if ll == 0:
        return np.sqrt((y - y0) ** 2 + (x - x0) ** 2)
    t = np.clip(((y - y0) * dy + (x - x0) * dx) / ll, 0.0, 1.0)
    return np.sqrt((y - y0 - t * dy) ** 2 + (x - x0 - t * dx) ** 2)


def smooth_noise(shape, sigma: float, rng: np.random.Generator, anisotropy: float = 1.0) -> np.ndarray:
    """Gaussian-smoothed white noise of unit standard deviation (float32).

    For large ``sigma`` it is drawn on a coarser grid and upsampled, so the cost stays
    about that of a small filter whatever the feature size. ``anisotropy`` > 1 stretches
    the features along the x axis (streaks).
    """
    h, w = shape
    sigma = max(float(sigma), 0.3)
    f = max(1, int(sigma / 1.5))
    sh, sw = h // f + 3, w // f + 3
    small = rng.standard_normal((sh, sw), dtype=np.float32)
    sig = sigma / f
    small = ndimage.gaussian_filter(small, (sig, sig * anisotropy), mode="wrap", truncate=3.0)
    if f > 1:
        small = ndimage.zoom(small, f, order=1, prefilter=False, grid_mode=False)
    out = small[:h, :w]
    sd = float(out.std())
    return (out - float(out.mean())) / (sd if sd > 1e-8 else 1.0)


def spots(shape, centres, sigma: float, weights=None) -> np.ndarray:
    """Gaussian spots of peak ~``weights`` (default 1) at ``centres`` ``[(y, x), ...]`` in one filter pass."""
    field = np.zeros(shape, np.float32)
    if len(centres):
        c = np.asarray(centres, np.float64)
        iy = np.clip(np.rint(c[:, 0]).astype(int), 0, shape[0] - 1)
        ix = np.clip(np.rint(c[:, 1]).astype(int), 0, shape[1] - 1)
        np.add.at(field, (iy, ix), 1.0 if weights is None else np.asarray(weights, np.float32))
        sigma = max(sigma, 0.4)
        field = ndimage.gaussian_filter(field, sigma, truncate=3.0)
        field *= 2 * math.pi * sigma * sigma
    return field


def disk_points(rng: np.random.Generator, n: int, radius: float):
    """``n`` points uniform in a disk of ``radius`` (``(n, 2)`` as ``(y, x)``)."""
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * math.pi, n)
    return np.stack([r * np.sin(a), r * np.cos(a)], axis=1)


def blur(od: np.ndarray, sigma: float) -> np.ndarray:
    """Defocus: Gaussian blur of an ``(h, w, 3)`` density stamp (no-op below 0.3 px)."""
    if sigma < 0.3:
        return od
    return ndimage.gaussian_filter(od, (sigma, sigma, 0), truncate=3.0)


def paste_add(canvas: np.ndarray, stamp: np.ndarray, y0: int, x0: int) -> None:
    """Add ``stamp`` into ``canvas`` with its top-left corner at ``(y0, x0)``, clipped to the canvas."""
    h, w = stamp.shape[:2]
    H, W = canvas.shape[:2]
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + h, H), min(x0 + w, W)
    if ya >= yb or xa >= xb:
        return
    canvas[ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]
