"""The smear around the leukocytes: red cells, platelets, stain, light, focus and noise.

One function, :func:`render_field`, forms every synthetic image, a 400 px single-cell
crop or a 4000 px smear field alike: leukocyte stamps are placed where the caller
says, red cells (biconcave discs, ~7.5 µm, allowed to touch and overlap a little)
and platelets fill the rest from small banks of pre-drawn stamps, and the summed
optical density becomes RGB by Beer-Lambert in row bands, so memory and time grow
with the area and not with the number of cells times the area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from leukoscope.synth import _draw as D

#: Mean red-cell diameter in µm.
RBC_DIAMETER_UM = 7.5


@dataclass(frozen=True)
class Look:
    """How one image was stained, lit and focused."""

    um_per_px: float
    white: tuple[float, float, float]   # background (illumination) colour
    stain: tuple[float, float, float]   # per-channel multiplier of all densities
    focus_px: float                     # defocus blur sigma in px
    rbc_cover: float                    # fraction of the free area covered by red cells
    rbc_spacing: float                  # least centre distance of two red cells, in radii
    platelets_per_rbc: float
    vignette: float
    gradient: tuple[float, float]
    noise: float                        # sensor noise, grey levels (sd)


def sample_look(rng: np.random.Generator, um_per_px: float) -> Look:
    """Draw the stain, illumination, focus and red-cell density of one image."""
    base = np.array([245.0, 241.0, 240.0]) + rng.normal(0, 3.0, 3) + rng.normal(0, 3.0)
    focus_um = 0.03 + 0.16 * rng.beta(1.3, 3.0)
    return Look(
        um_per_px=float(um_per_px),
        white=tuple(float(v) for v in np.clip(base, 200, 255)),
        stain=tuple(float(v) for v in np.exp(rng.normal(0, 0.07, 3) + rng.normal(0, 0.1))),
        focus_px=float(focus_um / um_per_px),
        rbc_cover=float(rng.uniform(0.4, 0.7)),
        rbc_spacing=float(rng.uniform(1.55, 1.9)),
        platelets_per_rbc=float(rng.uniform(0.02, 0.1)),
        vignette=float(rng.uniform(0.0, 0.06)),
        gradient=(float(rng.normal(0, 0.02)), float(rng.normal(0, 0.02))),
        noise=float(rng.uniform(0.8, 2.0)),
    )


def _rbc_stamp(rng: np.random.Generator, um_per_px: float, focus_px: float) -> np.ndarray:
    """One red cell: a biconcave disc (pale centre, denser rim), sometimes crenated."""
    r = max(float(np.clip(rng.normal(RBC_DIAMETER_UM, 0.45), 6.2, 8.8)) / 2 / um_per_px, 1.0)
    harm = D.harmonics(rng, 0.015, 2, 4)
    if rng.uniform() < 0.08:  # echinocyte: a crenated outline
        k = int(rng.integers(10, 15))
        harm.append((k, float(rng.uniform(0.03, 0.06)), float(rng.uniform(0, 2 * math.pi))))
    aspect = float(rng.uniform(1.0, 1.12))
    half = int(math.ceil(r * 1.15 * math.sqrt(aspect) + 3 * focus_px + 2))
    y, x = D.grid(half)
    mask, signed = D.blob(y, x, r, harm, aspect=aspect, angle=float(rng.uniform(0, math.pi)),
                          edge=max(0.1 / um_per_px, 0.5))
    rho2 = (y * y + x * x) / (r * r)
    pallor = float(rng.uniform(0.3, 0.8)) * np.exp(-0.5 * rho2 / float(rng.uniform(0.3, 0.45)) ** 2)
    rim = 0.3 * np.exp(-0.5 * (np.maximum(signed, 0) * um_per_px / 0.35) ** 2)
    thick = mask * (1.0 - pallor + rim)
    od = D.OD["rbc"] * thick[..., None]
    return D.blur(od.astype(np.float32), focus_px)


def _platelet_stamp(rng: np.random.Generator, um_per_px: float, focus_px: float) -> np.ndarray:
    """One platelet: a small purple, granular, irregular body."""
    r = max(float(rng.uniform(0.8, 1.6)) / um_per_px, 0.7)
    half = int(math.ceil(r * 1.4 + 3 * focus_px + 2))
    y, x = D.grid(half)
    mask, _ = D.blob(y, x, r, D.harmonics(rng, 0.12, 2, 6), aspect=float(rng.uniform(1.0, 1.5)),
                     angle=float(rng.uniform(0, math.pi)), edge=max(0.1 / um_per_px, 0.5))
    gran = 1.0 + 0.5 * np.tanh(D.smooth_noise(mask.shape, 0.2 / um_per_px, rng))
    od = D.OD["platelet"] * (float(rng.uniform(0.4, 0.9)) * mask * gran)[..., None]
    return D.blur(od.astype(np.float32), focus_px)


def _dihedral(stamp: np.ndarray, k: int) -> np.ndarray:
    if k & 1:
        stamp = stamp[::-1]
    if k & 2:
        stamp = stamp[:, ::-1]
    if k & 4:
        stamp = stamp.transpose(1, 0, 2)
    return stamp


def _scatter(rng: np.random.Generator, h: int, w: int, n: int, min_dist: float, pad: float,
             avoid: list[tuple[float, float, float]]) -> np.ndarray:
    """Up to ``n`` random centres ``(y, x)`` at least ``min_dist`` apart, off the ``avoid`` discs."""
    if n <= 0:
        return np.zeros((0, 2))
    m = int(n * 2.5) + 8
    pts = np.column_stack([rng.uniform(-pad, h + pad, m), rng.uniform(-pad, w + pad, m)])
    ok = np.ones(m, bool)
    for ay, ax, ar in avoid:
        ok &= (pts[:, 0] - ay) ** 2 + (pts[:, 1] - ax) ** 2 >= ar * ar
    pts = pts[ok]
    if min_dist <= 0 or len(pts) == 0:
        return pts[:n]
    nbrs = cKDTree(pts).query_ball_point(pts, min_dist)
    taken = np.zeros(len(pts), bool)
    count = 0
    for i, nb in enumerate(nbrs):
        if not taken[nb].any():
            taken[i] = True
            count += 1
            if count >= n:
                break
    return pts[taken]


def render_field(height: int, width: int, look: Look, leukocytes, rng: np.random.Generator,
                 band: int = 512) -> np.ndarray:
    """Form an ``(height, width, 3)`` uint8 image with leukocyte stamps at given centres.

    ``leukocytes`` is a list of ``(Leukocyte, cy, cx)``; red cells and platelets are
    placed around them (red cells may touch the leukocytes' edges, never cover them).
    """
    um = look.um_per_px
    od = np.zeros((height, width, 3), np.float32)
    r_rbc = RBC_DIAMETER_UM / 2 / um
    avoid = [(cy, cx, cell.radius + 0.55 * r_rbc) for cell, cy, cx in leukocytes]
    free = height * width - sum(math.pi * cell.radius ** 2 for cell, _, _ in leukocytes)
    n_rbc = int(round(look.rbc_cover * max(free, 0) / (math.pi * r_rbc ** 2) * 1.15))
    centres = _scatter(rng, height, width, n_rbc, look.rbc_spacing * r_rbc, r_rbc, avoid)
    bank = [_rbc_stamp(rng, um, look.focus_px) for _ in range(min(12, max(len(centres), 1)))]
    _paste_bank(od, bank, centres, rng, (0.8, 1.15))
    n_plt = int(rng.poisson(look.platelets_per_rbc * max(len(centres), 1)))
    plt_avoid = [(cy, cx, cell.radius + 1.0 / um) for cell, cy, cx in leukocytes]
    pcentres = _scatter(rng, height, width, n_plt, 0.0, 0.0, plt_avoid)
    pbank = [_platelet_stamp(rng, um, look.focus_px) for _ in range(min(6, max(len(pcentres), 1)))]
    _paste_bank(od, pbank, pcentres, rng, (0.7, 1.2))
    for cell, cy, cx in leukocytes:
        D.paste_add(od, cell.od, int(cy) - cell.half, int(cx) - cell.half)
    return _to_rgb(od, look, rng, band)


def _paste_bank(od: np.ndarray, bank, centres, rng: np.random.Generator, density) -> None:
    if len(centres) == 0:
        return
    pick = rng.integers(0, len(bank), len(centres))
    flips = rng.integers(0, 8, len(centres))
    dens = rng.uniform(density[0], density[1], len(centres)).astype(np.float32)
    for (cy, cx), b, f, d in zip(centres, pick, flips, dens):
        stamp = bank[b]
        half = stamp.shape[0] // 2
        D.paste_add(od, _dihedral(stamp, int(f)) * d, int(round(cy)) - half, int(round(cx)) - half)


def _to_rgb(od: np.ndarray, look: Look, rng: np.random.Generator, band: int) -> np.ndarray:
    """Beer-Lambert with the image's stain, light, vignetting and sensor noise, in row bands."""
    h, w = od.shape[:2]
    out = np.empty((h, w, 3), np.uint8)
    stain = np.asarray(look.stain, np.float32) * -1.0
    white = np.asarray(look.white, np.float32)
    xs = (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5)[None, :]
    gy, gx = look.gradient
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        ys = (np.arange(y0, y1, dtype=np.float32) / max(h - 1, 1) - 0.5)[:, None]
        light = 1.0 + gx * xs + gy * ys - look.vignette * (xs * xs + ys * ys) * 2.0
        img = np.exp(od[y0:y1] * stain) * white
        img *= light[..., None]
        img += rng.standard_normal(img.shape, dtype=np.float32) * look.noise
        np.clip(img + 0.5, 0, 255, out=img)
        out[y0:y1] = img.astype(np.uint8)
    return out
