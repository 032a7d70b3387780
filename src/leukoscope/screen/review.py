"""The review page: every cell of a screen as a gallery, most blast-like first.

``review.html`` is self-contained (cell images embedded as base64 PNG): the counts
with their confidence intervals and flags on top, the "not for diagnostic use"
caveat, then one card per cell with its class, calibrated confidence, P(blast) and,
when :mod:`leukoscope.evaluate.saliency` is available, a saliency map showing which
pixels drove the call. Cells are re-read from their smear (a small region each), so
nothing is kept in memory during the screen. The page is rendered from the Jinja2
template ``templates/review.html``.
"""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image

from leukoscope import INTENDED_USE, taxonomy
from leukoscope.evaluate.saliency import saliency_map
from leukoscope.io import atomic_write_text
from leukoscope.models.inference import forward
from leukoscope.models.ood import SHIFT_BANNER
from leukoscope.screen.crops import background_colour, crop_size_px, model_crops, model_fov_um
from leukoscope.screen.tiles import open_smear

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: At most this many cells on the page (the most blast-like, and every referred one, first).
MAX_CELLS = 600
#: Saliency maps for at most this many cells (one backward pass each).
MAX_SALIENCY = 64
THUMB_PX = 112


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb(arr: np.ndarray, size: int = THUMB_PX) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.LANCZOS))


def _heat(sal: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Saliency as a red overlay on a dimmed grey copy of the cell."""
    s = sal.astype(np.float64)
    hi = np.percentile(s, 99.5) if s.size else 0.0
    s = np.clip(s / hi, 0, 1) if hi > 0 else np.zeros_like(s)
    grey = base.mean(axis=2, keepdims=True) * 0.5
    out = np.concatenate([grey + s[..., None] * 255 * 0.8, grey * (1 - 0.5 * s[..., None]), grey * (1 - 0.5 * s[..., None])], axis=2)
    return np.clip(out, 0, 255).astype(np.uint8)


def select_cells(cells: pd.DataFrame, max_cells: int = MAX_CELLS) -> pd.DataFrame:
    """Cells for the gallery, sorted by P(blast) (highest first); referred cells always kept."""
    if cells.empty:
        return cells
    order = cells.sort_values("p_blast", ascending=False, kind="stable")
    if len(order) <= max_cells:
        return order
    referred = order[order.pred == "unidentified"]
    rest = order[order.pred != "unidentified"].head(max(0, max_cells - len(referred)))
    return pd.concat([referred, rest]).sort_values("p_blast", ascending=False, kind="stable").head(max_cells)


def _model_inputs(sel: pd.DataFrame, meta: dict, um_by_image: dict) -> dict:
    """Model inputs (S x S x 3 uint8) of the selected cells, re-read from their smears."""
    out = {}
    for image, grp in sel.groupby("image", sort=False):
        um = um_by_image.get(image)
        if not um:
            continue
        side = crop_size_px(model_fov_um(meta), um)
        try:
            smear = open_smear(image)
        except Exception:
            continue
        with smear:
            background = background_colour(smear.sample())  # the engine's padding colour
            for idx, row in grp.iterrows():
                y0, x0 = int(round(row.cy - side)), int(round(row.cx - side))
                ry0, rx0 = max(0, y0), max(0, x0)
                ry1, rx1 = min(smear.height, y0 + 2 * side), min(smear.width, x0 + 2 * side)
                region = smear.read(ry0, rx0, ry1, rx1)
                out[idx] = model_crops(region, [(row.cx - rx0, row.cy - ry0)], um, meta, background)[0]
    return out


def _saliency(bundle, inputs: dict, sel: pd.DataFrame, max_maps: int) -> tuple[dict, str | None]:
    """Saliency of the selected cells' model inputs: the very tensor the one forward path classifies."""
    if bundle is None:
        return {}, "saliency maps skipped: no model given to the review page"
    keys = [k for k in sel.index if k in inputs][:max_maps]
    if not keys:
        return {}, None
    classes = list(bundle.classes)
    try:
        x = forward(bundle, np.stack([inputs[k] for k in keys]), inputs=True).inputs
        target = [classes.index(sel.loc[k, "model_pred"]) for k in keys]
        maps = saliency_map(bundle.model, x, target)
    except Exception as exc:
        return {}, f"saliency maps skipped: {type(exc).__name__}: {exc}"
    note = None
    if len(sel) > len(keys):
        note = f"saliency maps for the {len(keys)} most blast-like cells only"
    return {k: maps[i] for i, k in enumerate(keys)}, note


def review_context(result, bundle=None, max_cells: int = MAX_CELLS, max_saliency: int = MAX_SALIENCY) -> dict:
    """Plain values for the template (numbers, strings, base64 PNGs)."""
    cells = result.cells
    summary = result.summary
    sel = select_cells(cells, max_cells)
    um_by_image = {im["image"]: im.get("um_per_px") for im in summary["images"]}
    meta = dict(bundle.meta) if bundle is not None else None
    inputs = _model_inputs(sel, meta, um_by_image) if meta is not None and not sel.empty else {}
    sal, sal_note = _saliency(bundle, inputs, sel, max_saliency) if inputs else ({}, None)
    notes = []
    if bundle is None:
        notes.append("cell images skipped: the review page was written without the model")
    if sal_note:
        notes.append(sal_note)
    if len(cells) > len(sel):
        notes.append(f"showing {len(sel)} of {len(cells)} cells (every referred cell and the most blast-like)")
    cards = []
    for idx, row in sel.iterrows():
        img = inputs.get(idx)
        cards.append({
            "image": os.path.basename(str(row.image)),
            "box": f"{int(row.x0)},{int(row.y0)}–{int(row.x1)},{int(row.y1)}",
            "pred": row.pred,
            "pred_name": taxonomy.CLASS_NAMES.get(row.model_pred, row.model_pred),
            "model_pred": row.model_pred,
            "referred": bool(row.referred),
            "confidence": float(row.confidence),
            "p_blast": float(row.p_blast),
            "png": _png(_thumb(img)) if img is not None else None,
            "saliency": _png(_thumb(_heat(sal[idx], img))) if idx in sal and img is not None else None,
        })
    overall = summary["overall"]
    rows = [{"cls": c, "name": taxonomy.CLASS_NAMES.get(c, c), **overall["differential"][c],
             "blast": c in taxonomy.BLAST} for c in result.classes]
    return {
        "intended_use": INTENDED_USE,
        "overall": overall,
        "rows": [r for r in rows if r["n"] > 0] or rows,
        "images": summary["images"],
        "errors": summary["errors"],
        "settings": summary["settings"],
        "model": summary["model"],
        "cards": cards,
        "notes": notes,
        "ood": summary.get("ood") or {},
        "shift": shift_banner(summary),
    }


def shift_banner(summary: dict) -> dict | None:
    """The review page's shift warning of a screen summary (``summary["ood"]["warning"]``), or ``None``."""
    ood = summary.get("ood") or {}
    if not ood.get("warning"):
        return None
    return {"banner": SHIFT_BANNER, "flagged": ood.get("flagged"), "total": ood.get("total")}


def pct(x, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * float(x):.{nd}f}%"


def write_review(result, path: str | os.PathLike, bundle=None, max_cells: int = MAX_CELLS,
                 max_saliency: int = MAX_SALIENCY) -> Path:
    """Render ``review.html`` for a :class:`~leukoscope.screen.engine.ScreenResult` (atomic)."""
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = pct
    html = env.get_template("review.html").render(**review_context(result, bundle, max_cells, max_saliency))
    return atomic_write_text(html, path)
