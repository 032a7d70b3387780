"""The one scale policy: where the µm/px of the images a model sees comes from.

Every path asks it — training (:func:`leukoscope.train.loop.resolve_training_scale`), ``predict``,
``evaluate`` (and the OOD reference) and the smear screen — and every path gets the same record
(:class:`ScaleRecord`). In order of precedence, an image's scale is:

1. **given** by the user (``--um-per-px``): every image;
2. the **table**'s / the file's own (a reader's ``um_per_px`` column, a TIFF's resolution tags);
3. **estimated** from the red cells (≈ 7.5 µm; :mod:`leukoscope.imaging.scale_estimate`), pooled
   over up to 40 images per source (``estimate="group"``), per image (``"image"``), or not at all
   (``"off"``); an implausible estimate is not used;
4. **none**: unknown; the image is resized to the model input as it is.

>>> import pandas as pd
>>> um, origin, rec = ScalePolicy(given=0.1).resolve(pd.DataFrame({"path": ["a.png", "b.png"]}))
>>> um.tolist(), origin.tolist(), rec.origin
([0.1, 0.1], ['user', 'user'], 'given')
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from leukoscope.imaging.scale_estimate import estimate_field_scale, resolve_um_per_px

#: Plausible µm/px of a blood-smear image (a 12 µm leukocyte between 12 and 600 px across).
UM_PER_PX_RANGE = (0.02, 1.0)
#: The summary origin of a set of images, from the per-image origins.
ORIGIN_GIVEN = "given"
ORIGIN_ESTIMATED = "estimated from red cells (7.5 µm), pooled per source"
ORIGIN_TABLE = "table"
ORIGIN_NONE = "none: images resized to the model input"


def check_um_per_px(um_per_px, what: str = "um_per_px") -> float:
    """Return ``um_per_px`` as a float if it is a plausible smear scale (:data:`UM_PER_PX_RANGE`), else
    raise ``ValueError`` naming ``what`` (where the value came from: an option, an argument, a row)
    and the plausible range. The one check of a stated µm/px, whatever the entry point."""
    lo, hi = UM_PER_PX_RANGE
    try:
        v = float(um_per_px)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of micrometres per pixel (plausible: {lo:g}-{hi:g} µm/px), "
                         f"got {um_per_px!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a positive, finite number of micrometres per pixel (plausible: "
                         f"{lo:g}-{hi:g} µm/px), got {um_per_px!r}")
    if not lo <= v <= hi:
        cell = 12.0 / v
        raise ValueError(
            f"{what} = {v:g} µm/px is outside the plausible range {lo:g}-{hi:g} µm/px for a blood smear "
            f"(a 12 µm leukocyte would be {cell:.3g} px across); check the value or the file's resolution tags "
            "(100x oil objectives give about 0.05-0.1 µm/px, 40x scanners about 0.25 µm/px)")
    return v


def _is_blank(v) -> bool:
    if v is None or v is pd.NA:
        return True
    if isinstance(v, str):
        return not v.strip()
    try:
        return bool(np.isnan(v))
    except TypeError:
        return False


def check_um_per_px_column(values, what: str = "row {row}", first_row: int = 0) -> np.ndarray:
    """A table's ``um_per_px`` column as floats (NaN: unknown), every stated value checked by
    :func:`check_um_per_px`.

    Blank cells (empty string, None, NaN) mean "unknown" and stay NaN; anything else must be a
    plausible scale, else ``ValueError`` naming the row: ``what`` is formatted with ``row`` (the
    row's position plus ``first_row``, e.g. ``first_row=2`` for CSV line numbers under a header).
    """
    values = list(values)
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if not _is_blank(v):
            out[i] = check_um_per_px(v.strip() if isinstance(v, str) else v, what.format(row=i + first_row))
    return out


def _finite_or_none(v):
    return float(v) if v is not None and np.isfinite(v) else None


@dataclass
class ScaleRecord:
    """Where the µm/px of a set of images came from (JSON-ready with :meth:`to_dict`).

    ``origin``: ``"given"``, ``"estimated from red cells ..."``, ``"table"`` or ``"none: ..."``;
    ``sources``: ``{source: {"um_per_px" (median), "origin" (per-image origins: user, table,
    estimated, fallback, unknown), "n_images"}}``; ``estimates``: ``{source: ScaleEstimate dict}``."""

    origin: str
    um_per_px: float | None = None
    sources: dict = field(default_factory=dict)
    estimates: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScalePolicy:
    """How to decide the µm/px of images: ``given`` (the user's, for all), else the table's, else
    ``estimate`` (``"group"``: pooled per ``group_col``; ``"image"``; ``"off"``)."""

    given: float | None = None
    estimate: str = "off"
    group_col: str = "source"
    max_images: int = 40

    def resolve(self, table: pd.DataFrame, *, reemit: bool = False,
                log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray, ScaleRecord]:
        """``(um_per_px per row (NaN: unknown), origin per row, record)`` for a table (``path``[,
        ``um_per_px``][, ``group_col``]); a given or stated µm/px outside the plausible range raises
        ``ValueError`` (:func:`check_um_per_px`, :func:`check_um_per_px_column`). Warnings (an implausible
        estimate) go into the record;
        ``reemit`` also issues them as ``RuntimeWarning``; ``log`` reports each estimate and warning."""
        if self.given is not None:
            check_um_per_px(self.given, "the given um_per_px")
        if "um_per_px" in table:
            check_um_per_px_column(table["um_per_px"], "the table's um_per_px (row {row})")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rs = resolve_um_per_px(table, user_um_per_px=self.given, estimate=self.estimate,
                                   group_col=self.group_col, max_images=self.max_images)
        rec = ScaleRecord(_summary(rs.origin), None if self.given is None else float(self.given))
        rec.warnings = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        for g, e in rs.estimates.items():
            rec.estimates[g] = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in e.items()}
            if e["plausible"] and log is not None:
                log(f"scale of {self.group_col} {g!r}: estimated {e['um_per_px']:.4f} µm/px from {e['n_rbc']} red "
                    f"cells in {e['n_images']} images")
        for w in rec.warnings:
            if reemit:
                warnings.warn(w, RuntimeWarning, stacklevel=3)
            if log is not None:
                log(f"warning: {w}")
        um = np.asarray(rs.um_per_px, dtype=float)
        groups = (table[self.group_col].astype(str).to_numpy() if self.group_col in table
                  else np.array(["all"] * len(table)))
        for g in pd.unique(groups):
            sel = groups == g
            known = um[sel][np.isfinite(um[sel])]
            rec.sources[str(g)] = {"um_per_px": float(np.median(known)) if len(known) else None,
                                   "origin": sorted(set(rs.origin[sel].tolist())), "n_images": int(sel.sum())}
        return um, rs.origin, rec

    def resolve_field(self, file_um_per_px: float | None, file_source: str | None,
                      sample: Callable[[], np.ndarray]) -> tuple[float, str, list[str], bool]:
        """One smear field: ``(µm/px, where it came from, notes, estimated?)`` — the user's (a note when
        it overrides the file's), the file's metadata, or estimated from the red cells of ``sample()``;
        an implausible scale raises ``ValueError``."""
        notes: list[str] = []
        if self.given is not None:
            given = check_um_per_px(self.given, "--um-per-px")
            if file_um_per_px and abs(file_um_per_px - given) / given > 0.05:
                notes.append(f"--um-per-px {given:g} overrides the file's {file_um_per_px:g} µm/px")
            return given, "command line (--um-per-px)", notes, False
        if file_um_per_px is not None:
            return check_um_per_px(file_um_per_px, f"the file's resolution metadata ({file_source})"), \
                file_source, notes, False
        if self.estimate == "off":
            raise ValueError("the file gives no µm/px; give the scale with --um-per-px")
        est = estimate_field_scale(sample())
        if not est.plausible:
            raise ValueError(f"the file gives no µm/px and it could not be estimated from red cells ({est.reason}); "
                             "give the scale with --um-per-px")
        um = check_um_per_px(est.um_per_px, "the µm/px estimated from red cells")
        notes.append(f"no µm/px in the file: {um:.4f} µm/px estimated from {est.n_rbc} red cells (median diameter "
                     f"{est.diameter_px:.0f} px = 7.5 µm); give --um-per-px for a measured scale")
        return um, "estimated from red cells (7.5 µm)", notes, True


def _summary(origin: np.ndarray) -> str:
    kinds = set(np.asarray(origin).tolist())
    if kinds and kinds <= {"user"}:
        return ORIGIN_GIVEN
    if "estimated" in kinds:
        return ORIGIN_ESTIMATED
    if "table" in kinds or "fallback" in kinds:
        return ORIGIN_TABLE
    return ORIGIN_NONE
