"""Bring a ``screen`` output or a ``predict`` table into a new review database.

A ``screen`` output folder holds ``cells.csv`` and ``summary.json``; each cell's crop
(its box plus a margin, squared, at least :data:`leukoscope.screen.crops.MIN_CROP_UM` wide: :func:`leukoscope.screen.crops.native_square`)
is the native-resolution crop the screen stored (``crop_native`` column) when present, else it is cut from the
ORIGINAL smear image at its native resolution (large TIFF scans are read region by region through
:func:`leukoscope.screen.tiles.open_smear`), and each field gets a downsampled
overview for the "place on its smear field" view. A ``predict`` table
(``path,pred,p_blast,p_atypical,prob_<CLASS>...``) gives one cell per image file, the
file itself being its crop.

The database is built in a temporary file beside the target and renamed into place
only when every cell has been imported: a failed import leaves nothing behind and
overwrites nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from leukoscope import __version__, taxonomy
from leukoscope.imaging.images import ImageError, load_rgb
from leukoscope.io import file_sha256
from leukoscope.models.bundle import read_meta
from leukoscope.models.ood import ood_summary
from leukoscope.screen.count import UNIDENTIFIED
from leukoscope.screen.crops import background_colour, cell_crop, native_square, png_bytes
from leukoscope.screen.engine import DEFAULT_REFER_BELOW
from leukoscope.screen.tiles import open_smear
from leukoscope.review.schema import ReviewDatabaseError, connect

#: Longest side of a field's overview image (px).
OVERVIEW_PX = 1200
#: Pixels read at a time when a field is downsampled for its overview (a strip of full-width rows).
STRIP_PIXELS = 16_000_000
DB_NAME = "review.sqlite"


class ReviewInputError(ValueError):
    """A path that cannot be reviewed; the message names it and says what was expected."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_kind(path: str | os.PathLike) -> str:
    """``screen`` (a folder with cells.csv and summary.json) or ``predict`` (a predictions CSV, or a folder
    holding one ``predictions.csv``); a :class:`ReviewInputError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise ReviewInputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "cells.csv").is_file() and (path / "summary.json").is_file():
            return "screen"
        if (path / "predictions.csv").is_file():
            return "predict"
        raise ReviewInputError(f"{path}: not a 'leukoscope screen' output (no cells.csv + summary.json) nor a "
                               "'leukoscope predict' output (no predictions.csv)")
    if path.suffix.lower() == ".csv":
        cols = pd.read_csv(path, nrows=0).columns
        if "path" in cols and "pred" in cols and any(str(c).startswith("prob_") for c in cols):
            return "predict"
        raise ReviewInputError(f"{path}: not a 'leukoscope predict' table (needs path, pred and prob_<CLASS> "
                               f"columns; has {list(cols)})")
    raise ReviewInputError(f"{path}: not a screen output folder nor a predictions CSV")


def run_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 identifying a run's results: cells.csv + summary.json of a screen, or the predictions CSV."""
    path = Path(path)
    if run_kind(path) == "screen":
        files = [path / "cells.csv", path / "summary.json"]
    else:
        files = [path / "predictions.csv" if path.is_dir() else path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def default_db_path(path: str | os.PathLike) -> Path:
    """Where ``leukoscope review PATH`` keeps its database: ``PATH/review.sqlite`` (beside a CSV)."""
    path = Path(path)
    return path / DB_NAME if path.is_dir() else path.with_name(path.stem + "." + DB_NAME)


def _class_columns(df: pd.DataFrame, where: Path) -> list[str]:
    classes = [c[len("prob_"):] for c in df.columns if str(c).startswith("prob_")]
    if not classes:
        raise ReviewInputError(f"{where}: no prob_<CLASS> columns")
    for c in classes:
        if not taxonomy.is_class(c):
            raise ReviewInputError(f"{where}: column prob_{c} is not a class of the taxonomy")
    return classes


def _top3(probs: np.ndarray, classes: list[str]) -> list[str]:
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:3]
        out.append(json.dumps([[classes[i], round(float(row[i]), 6)] for i in order]))
    return out


def _overview(smear) -> tuple[bytes, float]:
    """A downsampled PNG of a whole field (read in strips for scans) and the field px per overview px."""
    h, w = smear.shape
    step = max(1, int(math.ceil(max(h, w) / OVERVIEW_PX)))
    strip = max(step, (STRIP_PIXELS // max(1, w)) // step * step)  # bounded memory for scans of any width
    rows = [smear.read(y, 0, min(h, y + strip), w)[::step, ::step] for y in range(0, h, strip)]
    return png_bytes(np.concatenate(rows, axis=0)), float(step)


def _resolve_image(name: str, base: Path) -> Path:
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    return base / p


def _stored_crop(folder: Path, rel, side: int) -> np.ndarray | None:
    """The native-resolution crop the screen stored for a cell (``crop_native``), if it is there and fits."""
    if not isinstance(rel, str) or not rel:
        return None
    try:
        crop = load_rgb(folder / rel)
    except ImageError:
        return None  # moved or damaged: cut it from the smear again
    return crop if crop.shape[:2] == (side, side) else None


def _screen_rows(folder: Path):
    """Fields and cells of a screen output folder."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        cells = pd.read_csv(folder / "cells.csv")
    except (json.JSONDecodeError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ReviewInputError(f"{folder}: cells.csv or summary.json cannot be read ({exc})") from None
    need = {"image", "x0", "y0", "x1", "y1", "pred", "model_pred", "confidence", "p_blast", "referred"}
    if not need <= set(cells.columns) or "images" not in summary:
        raise ReviewInputError(f"{folder}: cells.csv/summary.json are not those of 'leukoscope screen' "
                               f"(missing {sorted(need - set(cells.columns)) or ['summary images']})")
    classes = _class_columns(cells, folder / "cells.csv")
    scales = {im["image"]: im.get("um_per_px") for im in summary["images"] if im.get("status") == "ok"}
    fields, rows = [], []
    probs = cells[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
    top3 = _top3(probs, classes)
    for image, idx in cells.groupby("image", sort=False).groups.items():
        path = _resolve_image(str(image), folder)
        try:
            smear = open_smear(path)
        except ImageError as exc:
            raise ReviewInputError(f"{folder}: the smear image of {len(idx)} cells cannot be read: {exc}; "
                                   "the review cuts each cell from the original image") from None
        with smear:
            overview, factor = _overview(smear)
            um = scales.get(image)
            fields.append((str(image), str(path.resolve()), smear.width, smear.height, um, factor, overview))
            fill = None
            for i in idx:
                r = cells.loc[i]
                cx, cy, side = native_square(r.x0, r.y0, r.x1, r.y1, um)
                ox, oy = int(round(cx - side / 2)), int(round(cy - side / 2))
                crop = _stored_crop(folder, r.get("crop_native"), side)
                if crop is None:
                    rx0, ry0 = max(0, ox), max(0, oy)
                    rx1, ry1 = min(smear.width, ox + side), min(smear.height, oy + side)
                    region = smear.read(ry0, rx0, ry1, rx1)
                    if fill is None and (rx1 - rx0, ry1 - ry0) != (side, side):
                        fill = background_colour(smear.sample())
                    crop = cell_crop(region, cx - rx0, cy - ry0, side, fill)
                ccx, ccy = (float(r.cx), float(r.cy)) if "cx" in cells else (cx, cy)
                rows.append((str(image), int(r.x0), int(r.y0), int(r.x1), int(r.y1), ccx, ccy, ox, oy, um, str(r.model_pred),
                             str(r.pred), float(r.confidence), top3[i], float(r.p_blast), int(bool(r.referred)),
                             png_bytes(crop)))
    run = {"kind": "screen", "classes": classes, "model": summary.get("model") or {},
           "scale": {"images": {k: v for k, v in scales.items()},
                     "sources": {im["image"]: im.get("um_per_px_source") for im in summary["images"]}},
           "refer_below": (summary.get("settings") or {}).get("refer_below"), "ood": summary.get("ood")}
    return run, fields, rows


def _predict_rows(csv: Path, um_per_px: float | None, refer_below: float):
    """One cell per image of a predictions table; the file itself is its crop."""
    df = pd.read_csv(csv)
    classes = _class_columns(df, csv)
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
    top3 = _top3(probs, classes)
    conf = probs.max(axis=1) if len(df) else np.zeros(0)
    p_blast = taxonomy.binary_scores(probs, classes, "blast")
    # images that look unlike the training data (predict's ood_flag) are referred like low-confidence ones
    shifted = (df["ood_flag"].astype(str).str.lower().eq("true").to_numpy() if "ood_flag" in df
               else np.zeros(len(df), dtype=bool))
    rows, missing = [], []
    for i, name in enumerate(df["path"].astype(str)):
        path = _resolve_image(name, csv.parent)
        try:
            img = load_rgb(path)
        except ImageError as exc:
            missing.append(str(exc))
            continue
        h, w = img.shape[:2]
        model_pred = classes[int(probs[i].argmax())]
        referred = bool(conf[i] < refer_below or shifted[i])
        rows.append((name, 0, 0, w, h, w / 2, h / 2, 0, 0, um_per_px, model_pred, UNIDENTIFIED if referred else model_pred,
                     float(conf[i]), top3[i], float(p_blast[i]), int(referred), png_bytes(img)))
    if missing:
        raise ReviewInputError(f"{csv}: {len(missing)} image(s) of the table cannot be read, e.g. {missing[0]}; "
                               "nothing was imported")
    run = {"kind": "predict", "classes": classes, "model": {},
           "scale": {"images": {}, "all": um_per_px,
                     "source": "given (--um-per-px)" if um_per_px else "unknown (images as the model saw them)"},
           "refer_below": refer_below,
           "ood": ood_summary(shifted, df["ood_score"].to_numpy(dtype=np.float64), None) if "ood_flag" in df else None}
    return run, [], rows


def build_database(source: str | os.PathLike, db_path: str | os.PathLike, *, model: str | os.PathLike | None = None,
                   um_per_px: float | None = None, refer_below: float = DEFAULT_REFER_BELOW) -> Path:
    """Import the run at ``source`` into a new review database ``db_path`` (atomically; never overwrites).

    ``model``: the model file, when the run does not name it (predict) or it has moved;
    ``um_per_px`` and ``refer_below``: for a predict table (its images' scale; the
    referral threshold on the top probability).
    """
    source, db_path = Path(source), Path(db_path)
    if db_path.exists():
        raise ReviewDatabaseError(f"{db_path}: already exists; not overwritten")
    kind = run_kind(source)
    if kind == "screen":
        run, fields, rows = _screen_rows(source)
    else:
        csv = source / "predictions.csv" if source.is_dir() else source
        run, fields, rows = _predict_rows(csv, um_per_px, refer_below)
    model_file = Path(model) if model else (Path(run["model"]["file"]) if run["model"].get("file") else None)
    if model is not None and not model_file.is_file():
        raise ReviewInputError(f"{model_file}: model file not found")
    sha = file_sha256(model_file) if model_file is not None and model_file.is_file() else None
    model_name = run["model"].get("name")
    if model_file is not None and model_file.is_file() and not model_name:

        model_name = read_meta(model_file).get("model")
    tmp = db_path.with_name(f".{db_path.name}.{os.getpid()}.importing")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    con = connect(tmp, create=True)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO run (id, source, kind, fingerprint, model_name, model_file, model_sha256, classes, "
                    "scale, refer_below, leukoscope_version, created, ood) VALUES (1,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (str(source.resolve()), kind, run_fingerprint(source), model_name,
                     str(model_file.resolve()) if model_file is not None and model_file.exists() else
                     (str(model_file) if model_file else None), sha, json.dumps(run["classes"]),
                     json.dumps(run["scale"]), run["refer_below"], __version__, now(),
                     json.dumps(run["ood"]) if run.get("ood") else None))
        con.executemany("INSERT INTO fields VALUES (?,?,?,?,?,?,?)", fields)
        con.executemany("INSERT INTO cells (image, x0, y0, x1, y1, cx, cy, crop_x0, crop_y0, um_per_px, model_pred, "
                        "model_call, confidence, top3, p_blast, referred, crop) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        con.execute("INSERT INTO rounds (round, created) VALUES (1, ?)", (now(),))
        con.execute("INSERT INTO decisions (cell_id, round, label) SELECT id, 1, model_call FROM cells")
        con.execute("COMMIT")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("PRAGMA journal_mode=DELETE")  # a single file to rename; reopened in WAL mode
    except BaseException:
        con.close()
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        raise
    con.close()
    if db_path.exists():  # made by someone else meanwhile
        tmp.unlink(missing_ok=True)
        raise ReviewDatabaseError(f"{db_path}: already exists; not overwritten")
    os.replace(tmp, db_path)
    return db_path
