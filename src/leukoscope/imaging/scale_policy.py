"""The one scale policy: where the µm/px of the images a model sees comes from.

Every path asks it — training (:func:`leukoscope.train.loop.resolve_training_scale`), ``predict``,
``evaluate`` (and the OOD reference) and the smear screen — and every path gets the same record
(:class:`ScaleRecord`). In order of precedence, an image's scale is:

1. **given** by the user (``--um-per-px``): every image;
2. the **table**'s / the file's own (a reader's ``um_per_px`` column, a TIFF's resolution tags);
3. **estimated** from the red cells (≈ 7.5 µm; :mod:`leukoscope.imaging.scale_estimate`), pooled
   over up to 40 images per source (``estimate="group"``), per image (``"image"``), or not at all
   (``"off"``); an implausible estimate is not used. Smear fields (:meth:`ScalePolicy.resolve_fields`)
   pool all red cells of the fields of one scan, folder or source, and a field whose own estimate
   differs from the pool by more than :data:`FIELD_SCALE_TOLERANCE` gets a warning and the pooled value;
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

from leukoscope.imaging.scale_estimate import (RBC_DIAMETER_UM, estimate_field_scale, field_rbc_diameters,
                                               pool_field_scales, resolve_um_per_px)

#: Plausible µm/px of a blood-smear image (a 12 µm leukocyte between 12 and 600 px across).
UM_PER_PX_RANGE = (0.02, 1.0)
#: The summary origin of a set of images, from the per-image origins.
ORIGIN_GIVEN = "given"
ORIGIN_ESTIMATED = "estimated from red cells (7.5 µm), pooled per source"
ORIGIN_TABLE = "table"
ORIGIN_NONE = "none: images resized to the model input"
#: Largest relative difference between a field's own red-cell estimate and the pooled estimate of its
#: scan/folder/source before the field is flagged (the pooled value is used either way). A single BCCD
#: field's estimate scatters by about ±10% (1 SD) around the pool, so 25% is ~2.5 SD: a field beyond it
#: is more likely of another optical scale (another objective or camera) than noise.
FIELD_SCALE_TOLERANCE = 0.25
#: Codes of where a field's scale came from (``scale_source`` in summary.json and cells.csv).
SCALE_SOURCES = ("given", "ome", "tiff_tag", "file_dpi", "pooled_estimate", "field_estimate")


@dataclass
class FieldInput:
    """One smear field for :meth:`ScalePolicy.resolve_fields`: its name, its pool (scan, folder or
    source), the file's own µm/px and its code (``"ome"``, ``"tiff_tag"``, ``"file_dpi"``) if any, and
    ``sample()`` returning the RGB pixels to measure red cells on (called only when an estimate is needed)."""

    name: str
    group: str
    file_um_per_px: float | None = None
    file_source: str | None = None        # human-readable, e.g. "file metadata (TIFF resolution)"
    file_code: str | None = None          # "ome" | "tiff_tag" | "file_dpi"
    sample: Callable[[], np.ndarray] | None = None


@dataclass
class FieldScale:
    """The scale of one field: value, code (:data:`SCALE_SOURCES`), a readable source, notes (warnings),
    its own red-cell estimate (NaN when not measured or failed) and its pool's name."""

    um_per_px: float | None
    code: str | None
    source: str | None
    notes: list = field(default_factory=list)
    field_um_per_px: float = float("nan")
    group: str | None = None
    error: str | None = None


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

    def resolve_fields(self, fields: list[FieldInput], tolerance: float = FIELD_SCALE_TOLERANCE,
                       log: Callable[[str], None] | None = None) -> tuple[list[FieldScale], dict]:
        """Scales of smear fields that share an optical scale per ``group`` (scan, folder or source).

        Given (``--um-per-px``) > the file's metadata > the red cells of all the group's fields without
        metadata, pooled (:func:`~leukoscope.imaging.scale_estimate.pool_field_scales`): every such field
        gets the pooled value (code ``pooled_estimate``; a group of one field: ``field_estimate``), and a
        field whose own estimate differs from it by more than ``tolerance`` (relative) gets a warning naming
        it. A field whose scale cannot be found gets ``error`` (the others go on). Returns the per-field
        scales and ``{group: pooled estimate, per-field spread, the fields}`` (JSON-ready).
        """
        out: list[FieldScale | None] = [None] * len(fields)
        todo: dict[str, list[int]] = {}
        for i, f in enumerate(fields):
            try:
                if self.given is not None or f.file_um_per_px is not None or self.estimate == "off":
                    um, src, notes, _ = self.resolve_field(f.file_um_per_px, f.file_source, lambda: None)
                    code = "given" if self.given is not None else (f.file_code or "tiff_tag")
                    out[i] = FieldScale(um, code, src, notes, group=f.group)
                else:
                    todo.setdefault(f.group, []).append(i)
            except ValueError as exc:
                out[i] = FieldScale(None, None, None, error=str(exc), group=f.group)
        pools: dict = {}
        for g, idx in todo.items():
            diams = []
            for i in idx:
                try:
                    diams.append(field_rbc_diameters(fields[i].sample()))
                except Exception as exc:  # unreadable here: the field itself will report it
                    diams.append(np.zeros(0))
                    out[i] = FieldScale(None, None, None, error=str(exc), group=g)
            pooled = pool_field_scales(diams)
            est = pooled.estimate
            pools[g] = {**pooled.to_dict(), "fields": [fields[i].name for i in idx], "tolerance": tolerance}
            code = "pooled_estimate" if len(idx) > 1 else "field_estimate"
            if est.plausible:
                try:
                    check_um_per_px(est.um_per_px, "the µm/px estimated from red cells")
                except ValueError as exc:
                    est.plausible, est.reason = False, str(exc)
            if log is not None and est.plausible:
                log(f"scale of {g!r}: {est.um_per_px:.4f} µm/px from {est.n_rbc} red cells in {len(idx)} field(s)")
            for k, i in enumerate(idx):
                if out[i] is not None:
                    continue
                own = pooled.field_um_per_px[k]
                if not est.plausible:
                    out[i] = FieldScale(None, None, None, field_um_per_px=own, group=g, error=(
                        f"the file gives no µm/px and it could not be estimated from red cells ({est.reason}); "
                        "give the scale with --um-per-px"))
                    continue
                um = est.um_per_px
                if len(idx) > 1:
                    src = f"estimated from red cells ({RBC_DIAMETER_UM:g} µm), pooled over {len(idx)} fields"
                    notes = [f"no µm/px in the file: {um:.4f} µm/px estimated from {est.n_rbc} red cells of "
                             f"{len(idx)} fields (median diameter {est.diameter_px:.0f} px = {RBC_DIAMETER_UM:g} µm); "
                             "give --um-per-px for a measured scale"]
                else:
                    src = f"estimated from red cells ({RBC_DIAMETER_UM:g} µm)"
                    notes = [f"no µm/px in the file: {um:.4f} µm/px estimated from {est.n_rbc} red cells (median "
                             f"diameter {est.diameter_px:.0f} px = {RBC_DIAMETER_UM:g} µm); give --um-per-px for a "
                             "measured scale"]
                if np.isfinite(own) and abs(own / um - 1) > tolerance:
                    notes.append(f"{fields[i].name}: this field's own red cells give {own:.4f} µm/px, "
                                 f"{abs(own / um - 1):.0%} from the {um:.4f} µm/px of its {len(idx)} pooled fields "
                                 f"(tolerance {tolerance:.0%}); the pooled value is used: check that this field "
                                 "was taken with the same objective and camera")
                out[i] = FieldScale(um, code, src, notes, own, g)
        return out, pools


def _summary(origin: np.ndarray) -> str:
    kinds = set(np.asarray(origin).tolist())
    if kinds and kinds <= {"user"}:
        return ORIGIN_GIVEN
    if "estimated" in kinds:
        return ORIGIN_ESTIMATED
    if "table" in kinds or "fallback" in kinds:
        return ORIGIN_TABLE
    return ORIGIN_NONE
