"""Synthetic leukocytes of the 15 classes, drawn from their morphological cues.

Each class is a table of parameter *ranges* (:data:`SPECS`): cell diameter in µm,
nuclear size, nucleus shape (round blob with Fourier wobble and an optional notch, or
a chain of lobes along an arc), chromatin texture, nucleoli, cytoplasm colour and
granules. A cell is one draw from those ranges. Ranges of the classes that examiners
confuse overlap on purpose (NGS/NGB: how pinched the nucleus is; MYB/MMZ/PMO: notch
depth, size and granularity; MYO/MOB: size, cytoplasm and nuclear irregularity), so
the classes are learnable but not trivially separable.

``make_cell(cls, seed, size)`` draws a 29 µm single-cell crop like an LMU image (a
leukocyte near the centre on a field of red cells and platelets); ``write_cells``
writes a whole dataset in the LMU layout with a simulated ``annotations.dat``.

A second synthetic *lab* (:data:`LABS`, ``lab="B"``) stains and images the same cells
otherwise: another stain (every optical density scaled per colour channel) and another
magnification (the crop spans fewer µm, so cells cover more pixels). A model trained on
lab A drops clearly on lab B zero-shot; the demo and the adaptation tests use it.

>>> img = make_cell("NGS", seed=1, size=64)
>>> img.shape, img.dtype
((64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import tifffile

from leukoscope import taxonomy
from leukoscope.imaging.scale import LMU_UM_PER_PX
from leukoscope.io import atomic_path, atomic_write_csv, atomic_write_text
from leukoscope.progress import tqdm
from leukoscope.synth import _draw as D
from leukoscope.synth.field import Look, render_field, sample_look

#: Field of view of an LMU crop in µm (400 px at 29/400 µm/px).
CROP_UM = 400 * LMU_UM_PER_PX

_BASE = {
    "cell_irreg": (0.01, 0.03), "cell_aspect": (1.0, 1.08),
    "nucleus": "blob", "nuc": (0.6, 0.7), "aspect": (1.0, 1.15), "irreg": (0.02, 0.05),
    "indent": (0.0, 0.0), "ecc": (0.0, 0.1),
    "nuc_colour": "nucleus", "nuc_od": (0.95, 1.1), "chrom": (0.35, (0.2, 0.3)),
    "nucleoli": (0, 0), "folds": (0, 0),
    "cyto": "cyto_neutro", "cyto_od": (0.9, 1.2), "rim": (0.0, 0.0),
    "granules": (), "auer": 0.0, "vacuoles": (0, 0),
}


def _spec(**kw):
    s = dict(_BASE)
    s.update(kw)
    return s


# Granule tuples: (colour, density per µm² of cytoplasm (lo, hi), size µm (lo, hi), P(over nucleus), strength)
_NEUTRO_DUST = ("gran_neutro", (1.5, 3.0), (0.22, 0.3), 0.0, 1.0)

#: Parameter ranges per class (µm for lengths; fractions of the cell radius for ``nuc``,
#: ``ecc`` and lobe ``width``). Read the comments as the morphology each encodes.
SPECS: dict[str, dict] = {
    # segmented neutrophil: 2-5 lobes joined by thin strands (constriction high)
    "NGS": _spec(diam=(12.5, 15.5), nucleus="arc", lobes=((2, 3, 4, 5), (0.2, 0.4, 0.3, 0.1)),
                 constriction=(0.6, 0.95), width=(0.2, 0.28), spacing=(0.95, 1.5), nuc=(0.36, 0.5),
                 nuc_od=(1.0, 1.2), chrom=(0.35, (0.25, 0.35)), granules=(_NEUTRO_DUST,)),
    # band neutrophil: a curved band of even width (constriction low; overlaps NGS at 0.45-0.6)
    "NGB": _spec(diam=(12.5, 15.5), nucleus="arc", lobes=((1, 2, 3), (0.5, 0.3, 0.2)),
                 constriction=(0.0, 0.7), width=(0.19, 0.27), spacing=(1.2, 2.0), span=(140, 290),
                 nuc=(0.36, 0.52),
                 nuc_od=(1.0, 1.2), chrom=(0.35, (0.25, 0.35)), granules=(_NEUTRO_DUST,)),
    # eosinophil: mostly bilobed, cytoplasm packed with coarse orange-red granules
    "EOS": _spec(diam=(13.5, 17.0), nucleus="arc", lobes=((2, 3), (0.8, 0.2)),
                 constriction=(0.5, 0.95), width=(0.22, 0.3), spacing=(0.9, 1.3), nuc=(0.32, 0.45),
                 nuc_od=(0.95, 1.15), cyto_od=(0.5, 0.9),
                 granules=(("gran_eos", (2.2, 3.2), (0.45, 0.65), 0.08, 1.0),)),
    # basophil: lobed pale nucleus hidden under coarse dark-purple granules
    "BAS": _spec(diam=(11.5, 15.0), nucleus="arc", lobes=((1, 2, 3), (0.3, 0.5, 0.2)),
                 constriction=(0.2, 0.7), width=(0.24, 0.32), spacing=(0.7, 1.1), span=(90, 200),
                 nuc=(0.25, 0.4), nuc_od=(0.9, 1.1), cyto="cyto_mono", cyto_od=(0.9, 1.4),
                 granules=(("gran_baso", (0.6, 1.2), (0.35, 0.7), 0.9, 0.8),)),
    # typical lymphocyte: small, round dense nucleus with clumped chromatin, thin blue rim
    "LYT": _spec(diam=(8.5, 12.0), nuc=(0.76, 0.9), aspect=(1.0, 1.15), indent=(0.0, 0.12), ecc=(0.0, 0.12),
                 nuc_od=(1.05, 1.3), chrom=(0.4, (0.28, 0.4)), cyto="cyto_lympho", cyto_od=(0.7, 1.2),
                 rim=(0.2, 0.6)),
    # atypical (reactive) lymphocyte: large, irregular nucleus, abundant deep-blue cytoplasm
    "LYA": _spec(diam=(12.0, 18.0), cell_irreg=(0.03, 0.09), cell_aspect=(1.0, 1.3), nuc=(0.58, 0.78),
                 aspect=(1.0, 1.4), irreg=(0.05, 0.12), indent=(0.0, 0.25), ecc=(0.0, 0.2),
                 nuc_od=(0.9, 1.1), chrom=(0.3, (0.2, 0.3)), cyto="cyto_lympho", cyto_od=(0.9, 1.5),
                 rim=(0.3, 0.8)),
    # monocyte: large, kidney-shaped folded nucleus with lacy chromatin, grey-blue vacuolated cytoplasm
    "MON": _spec(diam=(14.0, 19.0), cell_irreg=(0.02, 0.07), cell_aspect=(1.0, 1.15), nuc=(0.6, 0.78),
                 aspect=(1.1, 1.45), irreg=(0.04, 0.09), indent=(0.12, 0.35), ecc=(0.0, 0.15),
                 nuc_od=(0.85, 1.05), chrom=(0.25, (0.2, 0.3)), folds=(1, 3), cyto="cyto_mono",
                 cyto_od=(0.9, 1.3), vacuoles=(0, 6), granules=(("gran_azur", (0.1, 0.4), (0.2, 0.3), 0.0, 0.5),)),
    # monoblast: large, round-to-irregular nucleus with fine chromatin and nucleoli, ample grey-blue cytoplasm
    "MOB": _spec(diam=(15.0, 20.5), cell_irreg=(0.02, 0.06), nuc=(0.64, 0.82), aspect=(1.0, 1.3),
                 irreg=(0.03, 0.09), indent=(0.0, 0.2), ecc=(0.0, 0.15), nuc_colour="nucleus_blast",
                 nuc_od=(0.65, 0.85), chrom=(0.16, (0.15, 0.22)), nucleoli=(1, 2), folds=(0, 1),
                 cyto="cyto_blast", cyto_od=(1.0, 1.5), vacuoles=(0, 3)),
    # myeloblast: round nucleus, fine chromatin, nucleoli, scant grey-blue cytoplasm, occasional Auer rod
    "MYO": _spec(diam=(13.0, 18.0), nuc=(0.72, 0.88), aspect=(1.0, 1.2), irreg=(0.02, 0.06),
                 indent=(0.0, 0.12), ecc=(0.0, 0.12), nuc_colour="nucleus_blast", nuc_od=(0.7, 0.9),
                 chrom=(0.16, (0.15, 0.22)), nucleoli=(1, 3), cyto="cyto_blast", cyto_od=(0.9, 1.4),
                 auer=0.15, granules=(("gran_azur", (0.0, 0.15), (0.25, 0.35), 0.0, 1.0),)),
    # promyelocyte: large, eccentric nucleus, many azurophilic granules (also over the nucleus)
    "PMO": _spec(diam=(15.0, 21.0), nuc=(0.6, 0.76), aspect=(1.0, 1.25), indent=(0.0, 0.2), ecc=(0.1, 0.25),
                 nuc_colour="nucleus_blast", nuc_od=(0.75, 0.95), chrom=(0.22, (0.15, 0.25)),
                 nucleoli=(0, 2), cyto="cyto_blast", cyto_od=(0.8, 1.2), auer=0.05,
                 granules=(("gran_azur", (0.7, 1.5), (0.3, 0.45), 0.45, 1.0),)),
    # bilobed promyelocyte (APL variant): two large lobes, azurophilic granules
    "PMB": _spec(diam=(15.0, 20.0), nucleus="arc", lobes=((2,), (1.0,)), constriction=(0.3, 0.75),
                 width=(0.3, 0.38), spacing=(0.7, 1.0), nuc=(0.34, 0.46), nuc_colour="nucleus_blast",
                 nuc_od=(0.8, 1.0), chrom=(0.22, (0.15, 0.25)), cyto="cyto_blast", cyto_od=(0.8, 1.2),
                 auer=0.1, granules=(("gran_azur", (0.3, 1.0), (0.3, 0.45), 0.4, 1.0),)),
    # myelocyte: eccentric oval nucleus, slight notch, fewer granules, lilac cytoplasm
    "MYB": _spec(diam=(13.0, 18.0), nuc=(0.55, 0.72), aspect=(1.05, 1.35), indent=(0.04, 0.2),
                 ecc=(0.1, 0.25), nuc_od=(0.9, 1.1), chrom=(0.3, (0.22, 0.3)), cyto_od=(1.2, 1.7),
                 granules=(("gran_azur", (0.2, 0.8), (0.25, 0.4), 0.2, 0.8), _NEUTRO_DUST)),
    # metamyelocyte: kidney/bean nucleus (notch deeper than MYB), few granules
    "MMZ": _spec(diam=(12.0, 16.0), nuc=(0.55, 0.7), aspect=(1.2, 1.6), indent=(0.16, 0.4), ecc=(0.0, 0.15),
                 nuc_od=(0.95, 1.15), chrom=(0.35, (0.25, 0.35)), cyto_od=(1.0, 1.5),
                 granules=(("gran_azur", (0.05, 0.35), (0.25, 0.35), 0.1, 0.7), _NEUTRO_DUST)),
    # erythroblast: small, round, very dense nucleus; deep-blue cytoplasm
    "EBO": _spec(diam=(8.5, 12.5), cell_irreg=(0.005, 0.02), nuc=(0.45, 0.66), aspect=(1.0, 1.08),
                 irreg=(0.01, 0.03), ecc=(0.0, 0.15), nuc_od=(1.35, 1.65), chrom=(0.4, (0.15, 0.25)),
                 cyto="cyto_ery", cyto_od=(0.8, 1.3)),
    # smudge cell: ruptured nucleus smeared into a ragged blob or a lacy "basket"
    "KSC": _spec(diam=(8.0, 24.0), nucleus="smudge"),
}


@dataclass(frozen=True)
class Lab:
    """How a synthetic lab stains and images its cells.

    ``stain``: per-channel (R, G, B) factor on every optical density (cells, red cells and
    platelets alike), on top of each image's own stain variation; ``field_um``: µm that a
    crop spans (29 µm for lab A, the LMU field of view).
    """

    name: str
    stain: tuple[float, float, float]
    field_um: float
    description: str = ""


#: The synthetic labs. ``A`` is the default look (pixels unchanged by the lab option).
LABS: dict[str, Lab] = {
    "A": Lab("A", (1.0, 1.0, 1.0), CROP_UM, "May-Grünwald-Giemsa-like, 29 µm field (the default)"),
    "B": Lab("B", (0.55, 1.25, 2.6), 20.0, "a bluer, darker stain and a 20 µm field (1.45x magnification)"),
}


def get_lab(lab: str | Lab) -> Lab:
    """The :class:`Lab` named ``lab`` (or ``lab`` itself)."""
    if isinstance(lab, Lab):
        return lab
    try:
        return LABS[str(lab)]
    except KeyError:
        raise ValueError(f"unknown synthetic lab {lab!r}; known: {', '.join(LABS)}") from None


def _u(rng, lohi):
    lo, hi = lohi
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def _i(rng, lohi):
    lo, hi = lohi
    return int(rng.integers(lo, hi + 1))


@dataclass
class Leukocyte:
    """One drawn leukocyte: a square density stamp centred on the cell.

    ``od`` is ``(2*half+1, 2*half+1, 3)`` optical density, ``mask`` the cell's coverage
    and ``nucleus`` the nucleus's (0..1; > 0.5 is inside; a smudge cell is all
    nucleus), ``radius`` the largest distance of the cell from the stamp centre in px.
    """

    cls: str
    od: np.ndarray
    mask: np.ndarray
    nucleus: np.ndarray
    half: int
    radius: float

    def bbox(self, cy: int, cx: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the cell (mask > 0.5) when the stamp centre is at ``(cy, cx)``; x1, y1 exclusive."""
        ys, xs = np.nonzero(self.mask > 0.5)
        return (int(cx - self.half + xs.min()), int(cy - self.half + ys.min()),
                int(cx - self.half + xs.max() + 1), int(cy - self.half + ys.max() + 1))


def draw_leukocyte(cls: str, params_rng: np.random.Generator, texture_rng: np.random.Generator,
                   um_per_px: float, focus_px: float = 0.0) -> Leukocyte:
    """Draw one leukocyte of class ``cls`` as a density stamp at ``um_per_px``.

    Geometry comes from ``params_rng`` and textures (chromatin, lumpy lobe outlines)
    from ``texture_rng``, so the same parameter stream gives the same cell at every
    resolution.
    """
    spec = SPECS[taxonomy.check_class(cls)]
    if spec["nucleus"] == "smudge":
        return _draw_smudge(params_rng, texture_rng, um_per_px, focus_px)
    rng = params_rng
    P = lambda um: um / um_per_px  # noqa: E731  (µm -> px)
    R = P(_u(rng, spec["diam"]) / 2)
    cell_harm = D.harmonics(rng, _u(rng, spec["cell_irreg"]), 2, 7)
    cell_aspect = _u(rng, spec["cell_aspect"])
    cell_angle = float(rng.uniform(0, math.pi))
    bound = R * math.sqrt(cell_aspect) * (1 + sum(abs(a) for _, a, _ in cell_harm))
    half = int(math.ceil(bound + 3 * focus_px + P(0.6) + 2))
    y, x = D.grid(half)
    edge = max(P(0.12), 0.5)
    cell, cell_signed = D.blob(y, x, R, cell_harm, aspect=cell_aspect, angle=cell_angle, edge=edge)

    # nucleus
    nuc_angle = float(rng.uniform(0, 2 * math.pi))
    ecc = _u(rng, spec["ecc"])
    if spec["nucleus"] == "arc":
        n_choices, n_w = spec["lobes"]
        n = int(rng.choice(n_choices, p=np.asarray(n_w) / sum(n_w)))
        width = R * _u(rng, spec["width"])
        radius = R * _u(rng, spec["nuc"])
        radius = min(radius, 0.88 * R - width)  # keep the chain inside the cell
        if n > 1:  # lobes `spacing` lobe diameters apart, on at most 330 degrees of arc
            span = min((n - 1) * 2 * width * _u(rng, spec["spacing"]) / radius, math.radians(330))
        else:
            span = math.radians(_u(rng, spec["span"]))
        wob = D.harmonics(rng, 0.12, 1, 3)
        oy, ox = ecc * R * math.sin(nuc_angle), ecc * R * math.cos(nuc_angle)
        # centre the chain on the cell: the arc's centroid sits at radius*sinc(span/2) from its centre
        mid = float(rng.uniform(0, 2 * math.pi))
        c = radius * math.sin(span / 2) / (span / 2)
        oy -= c * math.sin(mid)
        ox -= c * math.cos(mid)
        nuc, nuc_signed = D.arc_chain(y - oy, x - ox, radius=radius, span=span, start=mid - span / 2,
                                      width=width, n_lobes=n, constriction=_u(rng, spec["constriction"]),
                                      edge=edge, wobble=wob, lobe_scale=rng.uniform(0.85, 1.12, n))
        # lumpy, not geometric, lobes
        nuc_signed = nuc_signed + 0.12 * width * D.smooth_noise(nuc_signed.shape, P(0.6), texture_rng)
        nuc = D.sigmoid_edge(nuc_signed, edge)
        rn = radius + width
        ncy, ncx = oy + c * math.sin(mid), ox + c * math.cos(mid)
    else:
        rn = R * _u(rng, spec["nuc"])
        ecc = min(ecc, max(0.0, 0.93 - rn / R))
        ncy, ncx = ecc * R * math.sin(nuc_angle), ecc * R * math.cos(nuc_angle)
        # a notch faces the cell centre (the hof side) when the nucleus is eccentric
        at = math.atan2(-ncy, -ncx) if ecc > 0.02 else float(rng.uniform(0, 2 * math.pi))
        nuc, nuc_signed = D.blob(y - ncy, x - ncx, rn, D.harmonics(rng, _u(rng, spec["irreg"]), 2, 6),
                                 aspect=_u(rng, spec["aspect"]), angle=at - math.pi / 2, edge=edge,
                                 bite=_u(rng, spec["indent"]), bite_radius=float(rng.uniform(0.45, 0.9)))
    nuc = nuc * cell

    # chromatin texture, nucleoli, folds
    sig_um, contrast = spec["chrom"]
    tex = texture_rng
    shape = cell.shape
    chrom = 1.0 + _u(rng, contrast) * np.tanh(1.3 * D.smooth_noise(shape, P(sig_um), tex))
    nuc_density = _u(rng, spec["nuc_od"])
    k = _i(rng, spec["nucleoli"])
    if k:
        pts = D.disk_points(rng, k, 0.45 * rn) + (ncy + half, ncx + half)
        nl = np.clip(D.spots(shape, pts, P(float(rng.uniform(0.35, 0.6)))), 0, 1)
        chrom *= 1.0 - 0.45 * nl
    for _ in range(_i(rng, spec["folds"])):
        a = float(rng.uniform(0, 2 * math.pi))
        dist = rn * float(rng.uniform(1.0, 1.6))
        fy, fx = ncy + dist * math.sin(a), ncx + dist * math.cos(a)
        rf = dist * float(rng.uniform(0.7, 1.0))
        line = np.exp(-0.5 * ((np.sqrt((y - fy) ** 2 + (x - fx) ** 2) - rf) / max(P(0.3), 0.5)) ** 2)
        chrom *= 1.0 - 0.25 * line
    nuc_od = D.OD[spec["nuc_colour"]] * (nuc_density * np.clip(chrom, 0.25, 2.0))[..., None]

    # cytoplasm
    cyto_tex = 1.0 + 0.12 * D.smooth_noise(shape, P(0.3), tex)
    cyto_density = _u(rng, spec["cyto_od"]) * cyto_tex
    rim = _u(rng, spec["rim"])
    if rim:
        cyto_density = cyto_density * (1.0 + rim * np.exp(-np.maximum(cell_signed, 0) / P(0.6)))
    nv = _i(rng, spec["vacuoles"])
    if nv:
        pts = D.disk_points(rng, nv, 0.85 * R) + half
        vac = np.clip(1.6 * D.spots(shape, pts, P(float(rng.uniform(0.25, 0.45)))), 0, 1)
        cyto_density = cyto_density * (1.0 - 0.8 * vac)
    cyto_od = D.OD[spec["cyto"]] * cyto_density[..., None]
    od = cell[..., None] * ((1.0 - nuc)[..., None] * cyto_od) + nuc[..., None] * nuc_od

    # granules
    cyto_area_um = max(float((cell - nuc).sum()) * um_per_px ** 2, 1.0)
    for colour, dens, size, over, strength in spec["granules"]:
        n = int(rng.poisson(_u(rng, dens) * cyto_area_um))
        if n == 0:
            continue
        pts = D.disk_points(rng, 3 * n, 1.02 * R)
        iy = np.clip(np.rint(pts[:, 0] + half).astype(int), 0, shape[0] - 1)
        ix = np.clip(np.rint(pts[:, 1] + half).astype(int), 0, shape[1] - 1)
        keep = (cell[iy, ix] > 0.6) & ((nuc[iy, ix] < 0.5) | (rng.uniform(0, 1, len(pts)) < over))
        pts = pts[keep][:n] + half
        g = D.spots(shape, pts, P(_u(rng, size)) / 2.2, weights=rng.uniform(0.5, 1.2, len(pts)))
        od += (D.OD[colour] * strength) * (np.minimum(g, 1.6) * cell)[..., None]

    if rng.uniform() < spec["auer"]:
        cand = np.argwhere((cell > 0.9) & (nuc < 0.05))
        if len(cand):
            cy0, cx0 = cand[int(rng.integers(len(cand)))] - half
            a = float(rng.uniform(0, math.pi))
            L = P(float(rng.uniform(2.0, 4.5))) / 2
            p0 = (cy0 - L * math.sin(a), cx0 - L * math.cos(a))
            p1 = (cy0 + L * math.sin(a), cx0 + L * math.cos(a))
            rod = D.sigmoid_edge(P(float(rng.uniform(0.15, 0.28))) - D.segment_distance(y, x, p0, p1), edge * 0.7)
            od += D.OD["auer"] * (rod * cell)[..., None]

    od = D.blur(od.astype(np.float32, copy=False), focus_px)
    return Leukocyte(cls, od, cell, nuc, half, float(bound))


def _draw_smudge(rng: np.random.Generator, tex: np.random.Generator, um_per_px: float, focus_px: float) -> Leukocyte:
    """Smudge cell: nuclear material of a ruptured cell, a ragged blob or a lacy basket."""
    P = lambda um: um / um_per_px  # noqa: E731
    basket = rng.uniform() < 0.45
    diam = float(rng.uniform(13.0, 24.0) if basket else rng.uniform(7.5, 13.0))
    R = P(diam / 2)
    aspect = float(rng.uniform(1.0, 1.7))
    harm = D.harmonics(rng, float(rng.uniform(0.08, 0.2)), 2, 9)
    bound = R * math.sqrt(aspect) * (1 + sum(abs(a) for _, a, _ in harm))
    half = int(math.ceil(bound + 3 * focus_px + 3))
    y, x = D.grid(half)
    edge = max(P(0.15), 0.5)
    angle = float(rng.uniform(0, math.pi))
    _, signed = D.blob(y, x, R, harm, aspect=aspect, angle=angle, edge=edge)
    ragged = D.smooth_noise(signed.shape, P(float(rng.uniform(0.3, 0.7))), tex)  # torn, frayed outline
    mask = D.sigmoid_edge(signed + float(rng.uniform(0.06, 0.16)) * R * ragged, edge)
    streak = D.smooth_noise(mask.shape, P(0.35), tex, anisotropy=float(rng.uniform(1.0, 2.0)))
    if rng.uniform() < 0.5:
        streak = streak.T
    if basket:
        lace = np.exp(-(D.smooth_noise(mask.shape, P(1.0), tex) / 0.7) ** 2)
        core, _ = D.blob(y - R * float(rng.uniform(-0.3, 0.3)), x - R * float(rng.uniform(-0.3, 0.3)),
                         R * float(rng.uniform(0.3, 0.55)), D.harmonics(rng, 0.12, 2, 6), edge=P(0.8))
        density = float(rng.uniform(0.3, 0.5)) * (0.45 + 1.1 * lace + 0.15 * streak) + 0.7 * core
    else:
        density = float(rng.uniform(0.7, 1.05)) * (1.0 + 0.2 * np.tanh(streak))
    od = D.OD["smudge"] * (np.clip(density, 0.05, 3.0) * mask)[..., None]
    od = D.blur(od.astype(np.float32, copy=False), focus_px)
    return Leukocyte("KSC", od, mask, mask, half, float(bound))


def _rngs(seed: int, cls: str):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ss = np.random.SeedSequence([int(seed), taxonomy.class_index(cls), 0x1E4C0])
    return [np.random.default_rng(s) for s in ss.spawn(4)]


def make_cell(cls: str, seed: int, size: int = 400, um_per_px: float | None = None,
              lab: str | Lab = "A") -> np.ndarray:
    """A synthetic single-cell image of class ``cls``: ``(size, size, 3)`` uint8 RGB.

    Like an LMU crop, the image covers 29 µm whatever ``size`` is (``um_per_px`` defaults
    to ``29 / size``; pass it to draw at another magnification). ``lab`` (:data:`LABS`):
    another lab's stain and field of view (``field_um / size`` µm/px); lab ``"A"`` is
    the default look. The same
    ``(cls, seed, size, um_per_px)`` always gives the same pixels, and the same
    ``(cls, seed)`` gives the same cell (size in µm, shape, layout) at every size; only
    the fine textures are drawn anew for each resolution.

    >>> make_cell("MYO", seed=3, size=96).shape
    (96, 96, 3)
    """
    taxonomy.check_class(cls)
    if int(size) != size or size < 16:
        raise ValueError(f"size must be an integer of at least 16 px, got {size!r}")
    size = int(size)
    lab = get_lab(lab)
    um = lab.field_um / size if um_per_px is None else float(um_per_px)
    if not (um > 0 and math.isfinite(um)):
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}")
    params, texture, look_rng, background = _rngs(seed, cls)
    look = sample_look(look_rng, um)
    if lab.stain != (1.0, 1.0, 1.0):
        look = replace(look, stain=tuple(float(a * b) for a, b in zip(look.stain, lab.stain)))
    cell = draw_leukocyte(cls, params, texture, um, look.focus_px)
    jitter = look_rng.normal(0, 0.6 / um, 2)  # cells sit near, not exactly at, the centre
    cy, cx = (int(round(size / 2 + j)) for j in jitter)
    return render_field(size, size, look, [(cell, cy, cx)], background)


# ---------------------------------------------------------------- dataset writer

#: Classes an examiner may take a cell of each class for (the hard pairs of real smears).
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "NGS": ("NGB",), "NGB": ("NGS", "MMZ"), "MYB": ("MMZ", "PMO"), "MMZ": ("MYB", "NGB"),
    "PMO": ("MYB", "MYO", "PMB"), "PMB": ("PMO",), "MYO": ("MOB", "PMO", "LYA"), "MOB": ("MYO", "MON"),
    "MON": ("MOB", "LYA"), "LYT": ("LYA", "EBO"), "LYA": ("LYT", "MON"), "EBO": ("LYT",),
    "EOS": ("NGS",), "BAS": ("EOS",), "KSC": ("LYT",),
}


def simulate_examiners(gold: Sequence[str], fraction: float, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Re-annotations ``(re1, re2)`` per image: ``nan`` unless the image is among ``fraction``.

    Each examiner mostly agrees with gold, sometimes names a confusable class, now and
    then says ``UNC`` (could not decide), and rarely any other class; the second examiner
    shares the first's mistake half of the time, as real examiners do.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"reannotate_fraction must be between 0 and 1, got {fraction}")
    nan = taxonomy.NOT_ANNOTATED
    out = []
    for g in gold:
        if rng.uniform() >= fraction:
            out.append((nan, nan))
            continue
        first = _examiner(g, rng)
        second = first if first != g and rng.uniform() < 0.5 else _examiner(g, rng)
        out.append((first, second))
    return out


def _examiner(gold: str, rng: np.random.Generator) -> str:
    u = rng.uniform()
    if u < 0.86:
        return gold
    if u < 0.95:
        return str(rng.choice(CONFUSABLE.get(gold, (gold,))))
    if u < 0.98:
        return taxonomy.UNCERTAIN
    return str(rng.choice(taxonomy.CLASSES))


def cell_seed(seed: int, cls: str, index: int) -> int:
    """Seed of image ``index`` of class ``cls`` in a dataset written with ``seed``."""
    return int(np.random.SeedSequence([int(seed), taxonomy.class_index(cls), int(index)]).generate_state(1)[0])


def _write_one(job) -> str:
    cls, seed, size, path, lab = job
    img = make_cell(cls, seed, size, lab=lab)
    with atomic_path(path, durable=False) as tmp:  # one of thousands, made again from the seed: no fsync
        tifffile.imwrite(tmp, img, photometric="rgb")
    return str(path)


def write_cells(out_dir: str | os.PathLike, per_class: int, seed: int = 0, size: int = 400,
                classes: Sequence[str] = taxonomy.CLASSES, reannotate_fraction: float = 0.1,
                workers: int = 1, progress: bool | None = None, lab: str | Lab = "A") -> Path:
    """Write a synthetic dataset in the LMU layout; returns ``out_dir``.

    ``out_dir/CLASS/CLASS_NNNN.tiff`` (RGB, ``size`` px, numbered from 0001) for each
    class, and ``out_dir/annotations.dat`` with one line per file,
    ``CLASS/CLASS_NNNN.tiff GOLD RE1 RE2``, the re-annotations simulated by
    :func:`simulate_examiners`. ``workers > 1`` draws in a process pool; ``progress``
    (default: when more than 200 images) shows a tqdm bar.

    Another ``lab`` (e.g. ``"B"``) writes the same files but, instead of ``annotations.dat``
    (whose LMU layout states a 29 µm field), a ``labels.csv`` manifest
    ``path,label,source,um_per_px`` with source ``synth_lab_B`` and the µm/px left blank
    (unknown, as in many labs' exports); the cells of lab B are other draws than lab A's
    (the lab's name enters the seeds).
    """
    classes = [taxonomy.check_class(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes listed twice: {sorted({c for c in classes if classes.count(c) > 1})}")
    if int(per_class) != per_class or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    classes = [c for c in taxonomy.CLASSES if c in classes]  # taxonomy order
    lab = get_lab(lab)
    if lab.name != "A":  # other cells than lab A's for the same seed
        seed = int(np.random.SeedSequence([int(seed), *map(ord, lab.name)]).generate_state(1)[0])
    out = Path(out_dir)
    digits = max(4, len(str(per_class)))
    jobs, rel = [], []
    for cls in classes:
        (out / cls).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            name = f"{cls}/{cls}_{i:0{digits}d}.tiff"
            rel.append((name, cls))
            jobs.append((cls, cell_seed(seed, cls, i), size, out / name, lab))
    show = len(jobs) > 200 if progress is None else progress
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            it = pool.map(_write_one, jobs, chunksize=8)
            _consume(it, len(jobs), show)
    else:
        _consume(map(_write_one, jobs), len(jobs), show)
    if lab.name != "A":
        atomic_write_csv(pd.DataFrame({"path": [n for n, _ in rel], "label": [c for _, c in rel],
                                       "source": f"synth_lab_{lab.name}", "um_per_px": ""}), out / "labels.csv")
        return out
    ann_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA2207]))
    re = simulate_examiners([c for _, c in rel], reannotate_fraction, ann_rng)
    lines = [f"{name} {cls} {r1} {r2}" for (name, cls), (r1, r2) in zip(rel, re)]
    atomic_write_text("\n".join(lines) + "\n", out / "annotations.dat")
    return out


def _consume(it, total: int, show: bool) -> None:
    if show:
        it = tqdm(it, total=total, unit="cell", desc="synth cells")
    for _ in it:
        pass
