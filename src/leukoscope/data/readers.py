"""Readers that turn a labelled single-cell collection into one dataset table.

Three layouts are built in:

``lmu``
    AML-Cytomorphology_LMU: ``CLASS/CLASS_NNNN.tiff`` plus ``annotations.dat``
    (``path gold reannotation1 reannotation2``; ``nan`` = not re-annotated,
    ``UNC`` = the examiner could not assign a class).
``folders``
    One sub-folder per class, the folder name being the label (or mapped to one
    through a label map).
``manifest``
    A CSV file ``path,label[,patient][,source][,um_per_px][,...]``; paths are
    relative to the manifest's folder unless absolute. A folder holding
    ``labels.csv`` is read as that manifest. Rows with an empty label are skipped
    and counted; a stated ``um_per_px`` must be plausible (blank = unknown).

An image listed twice (in ``annotations.dat`` or a manifest) with different labels is refused
with the line numbers; identical lines are used once, with a warning and a note. An unreadable
file raises :class:`DataError` naming it.

A reader registers itself with :func:`register_reader` (a name, a test that recognises its layout,
and the function that reads it); :func:`detect_layout` and :func:`read_dataset` dispatch through
the registry, so a new format is one function and one registration::

    @register_reader("mylab", detect=lambda p: (p / "mylab.json").exists())
    def read_mylab(path, label_map=None) -> CellDataset: ...

:func:`read_datasets` reads several datasets (several labs) into one table, with a ``source``
per dataset.

Every reader returns a :class:`CellDataset` whose ``table`` has one row per
usable image: ``path`` (absolute), ``label`` (a class of
:data:`leukoscope.taxonomy.CLASSES`), ``patient`` (or NA), ``source``,
``um_per_px`` (NaN when unknown). Problems are collected in ``skipped`` and
``notes``; nothing is silently dropped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from leukoscope import taxonomy
from leukoscope.imaging.images import IMAGE_SUFFIXES, ImageError, image_size, is_image_file, load_rgb, stored_mode
from leukoscope.imaging.scale import LMU_FIELD_UM, LMU_UM_PER_PX
from leukoscope.imaging.scale_policy import check_um_per_px
from leukoscope.progress import tqdm

ANNOTATIONS_NAME = "annotations.dat"
MANIFEST_NAMES = ("labels.csv", "manifest.csv")
TABLE_COLUMNS = ["path", "label", "patient", "source", "um_per_px"]


class DataError(ValueError):
    """A dataset file (annotations.dat, a manifest) that cannot be read as one; the message names the
    file (and the line, where there is one) and the problem."""


@dataclass
class CellDataset:
    """A labelled single-cell collection as one table, plus what was found wrong."""

    table: pd.DataFrame
    layout: str
    root: Path
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    def counts(self) -> dict[str, int]:
        """Images per class, in taxonomy order, classes without images included as 0."""
        vc = self.table["label"].value_counts()
        return {c: int(vc.get(c, 0)) for c in taxonomy.CLASSES}

    @property
    def classes(self) -> tuple[str, ...]:
        """Classes with at least one image, in taxonomy order."""
        present = set(self.table["label"])
        return tuple(c for c in taxonomy.CLASSES if c in present)

    def relpaths(self) -> list[str]:
        return [os.path.relpath(p, self.root) for p in self.table["path"]]

    def fingerprint(self) -> str:
        """SHA-256 over sorted (relative path, label, file size): identifies the training data."""
        h = hashlib.sha256()
        rows = sorted(zip(self.relpaths(), self.table["label"], self.table["path"]))
        for rel, lab, full in rows:
            try:
                size = os.path.getsize(full)
            except OSError:
                size = -1
            h.update(f"{rel}\t{lab}\t{size}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        """JSON-ready description: counts, problems, notes."""
        out = {
            "root": str(self.root),
            "layout": self.layout,
            "n_images": int(len(self.table)),
            "classes": self.counts(),
            "skipped": list(self.skipped),
            "notes": list(self.notes),
        }
        out.update(self.extra)
        return out


# ----------------------------------------------------------------------------- helpers


def read_label_map(spec: str | os.PathLike | Mapping[str, str] | None) -> dict[str, str] | None:
    """Read a label mapping: a dict, a JSON object file, or a CSV with two columns
    (``source_label,label``). Targets must be taxonomy classes (or empty = skip)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        mapping = {str(k): str(v) for k, v in spec.items()}
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"label map {path}: file not found")
        if path.suffix.lower() == ".json":
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"label map {path}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"label map {path}: expected a JSON object {{\"source label\": \"LMU class\", ...}}, "
                                 f"got a {type(obj).__name__}")
            mapping = {str(k): ("" if v is None else str(v)) for k, v in obj.items()}
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
            if df.shape[1] < 2:
                raise ValueError(f"label map {path}: needs two columns (source label, LMU class)")
            mapping = dict(zip(df.iloc[:, 0].str.strip(), df.iloc[:, 1].str.strip()))
    bad = sorted({v for v in mapping.values() if v and not taxonomy.is_class(v)})
    if bad:
        raise ValueError(f"label map maps to unknown classes {bad}; expected one of {', '.join(taxonomy.CLASSES)}")
    return mapping


def _frame(rows: list[dict]) -> pd.DataFrame:
    return _tidy(pd.DataFrame(rows))


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """The table's columns in order (missing ones added as NA), sorted by path."""
    df = df.copy()
    for col in TABLE_COLUMNS:
        if col not in df:
            df[col] = np.nan if col == "um_per_px" else pd.NA
    df["um_per_px"] = pd.to_numeric(df["um_per_px"], errors="coerce").astype(float)
    cols = TABLE_COLUMNS + [c for c in df.columns if c not in TABLE_COLUMNS]
    return df[cols].sort_values("path", kind="stable").reset_index(drop=True)


def _stated_um_per_px(value, what: str) -> float:
    """A manifest cell's µm/px: blank -> NaN (unknown); otherwise checked by the one validator."""
    if value is None or not str(value).strip():
        return np.nan
    try:
        return check_um_per_px(str(value).strip(), what)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _resolve_label(raw: str, label_map: Mapping[str, str] | None) -> str:
    raw = (raw or "").strip()
    if label_map is not None and raw in label_map:
        return label_map[raw]
    return raw


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Reader:
    """A registered layout: ``detect(path)`` says whether ``path`` holds it (``path`` exists; a file or
    a folder), ``read(path, label_map)`` reads it. Layouts are tried by ``priority``, lowest first."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., "CellDataset"]
    priority: int = 50


_READERS: dict[str, Reader] = {}
_BUILT_IN = ("lmu", "manifest", "folders")


def register_reader(name: str, detect: Callable[[Path], bool], *, priority: int = 50):
    """Decorator: register ``read(path, label_map=None) -> CellDataset`` as layout ``name``.

    ``detect(path)`` gets an existing file or folder and says whether it holds this layout; layouts
    are tried by ``priority`` (lowest first, then in order of registration). The built-in ones:
    ``lmu`` 10, ``manifest`` 20, ``folders`` 90 (any folder with sub-folders: the catch-all).
    """
    if name in _READERS:
        raise ValueError(f"a dataset reader named {name!r} is registered already")

    def register(read: Callable[..., CellDataset]) -> Callable[..., CellDataset]:
        _READERS[name] = Reader(name, detect, read, priority)
        return read

    return register


def unregister_reader(name: str) -> None:
    """Remove layout ``name`` from the registry (a ``KeyError`` names the known ones if it is absent)."""
    if name not in _READERS:
        raise KeyError(f"no dataset reader named {name!r}; known: {', '.join(_READERS)}")
    del _READERS[name]


def registered_readers() -> list[Reader]:
    """The registered layouts in the order :func:`detect_layout` tries them."""
    order = {n: i for i, n in enumerate(_READERS)}
    return sorted(_READERS.values(), key=lambda r: (r.priority, order[r.name]))


def detect_layout(path: str | os.PathLike) -> str:
    """The first registered layout that recognises ``path`` (built in: ``lmu``, ``manifest``,
    ``folders``); raises if the path holds none of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for reader in registered_readers():
        if reader.detect(path):
            return reader.name
    others = [r.name for r in registered_readers() if r.name not in _BUILT_IN]
    also = f"; registered layouts: {', '.join(others)}" if others else ""
    if path.is_file():
        raise DataError(f"{path}: not a dataset (expected a folder, annotations.dat or a CSV manifest{also})")
    raise DataError(
        f"{path}: no dataset found (no {ANNOTATIONS_NAME}, no labels.csv manifest, no class folders{also})"
    )


def _holds_lmu(path: Path) -> bool:
    return path.name == ANNOTATIONS_NAME if path.is_file() else (path / ANNOTATIONS_NAME).exists()


def _holds_manifest(path: Path) -> bool:
    return path.suffix.lower() == ".csv" if path.is_file() else any((path / n).exists() for n in MANIFEST_NAMES)


def _holds_class_folders(path: Path) -> bool:
    return path.is_dir() and any(d.is_dir() for d in path.iterdir())


# ----------------------------------------------------------------------------- LMU


def read_annotations(path: str | os.PathLike) -> pd.DataFrame:
    """Read LMU ``annotations.dat``: columns ``path, gold, reannotation1, reannotation2``.

    ``nan`` marks an image that was not re-annotated and stays the string ``"nan"``;
    ``UNC`` marks one the examiner could not assign. Malformed lines raise a
    :class:`DataError` naming the file and line.

    An image listed more than once (paths compared after normalisation, ``./A/x.tiff`` =
    ``A/x.tiff``): with different labels on its lines the file is refused (a :class:`DataError`
    naming the image and its line numbers: which label is right cannot be guessed); lines that
    repeat the same labels are collapsed to the first one, with a ``RuntimeWarning`` naming the
    lines, and are listed in ``df.attrs["duplicates"]`` (``[{"path", "lines"}]``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: annotation file not found")
    rows, linenos = [], []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) == 2:
                    parts += [taxonomy.NOT_ANNOTATED, taxonomy.NOT_ANNOTATED]
                if len(parts) != 4:
                    raise DataError(f"{path}:{lineno}: expected 'path gold reannotation1 reannotation2', "
                                    f"got {line.strip()[:200]!r}")
                parts[0] = posixpath.normpath(parts[0])
                rows.append(parts)
                linenos.append(lineno)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file in UTF-8 (byte {exc.start}): not an annotations.dat") from None
    if not rows:
        raise DataError(f"{path}: annotation file is empty")
    df = pd.DataFrame(rows, columns=["path", "gold", "reannotation1", "reannotation2"])
    bad = sorted(set(df["gold"]) - set(taxonomy.CLASSES))
    if bad:
        raise DataError(f"{path}: unknown gold labels {_some(bad)}")
    allowed = set(taxonomy.CLASSES) | {taxonomy.UNCERTAIN, taxonomy.NOT_ANNOTATED}
    for col in ("reannotation1", "reannotation2"):
        badr = sorted(set(df[col]) - allowed)
        if badr:
            raise DataError(f"{path}: unknown labels in {col}: {_some(badr)}")
    df["line"] = linenos
    dup = df[df["path"].duplicated(keep=False)]
    conflicts, repeats = [], []
    for p, g in dup.groupby("path", sort=False):
        labels = {tuple(r) for r in g[["gold", "reannotation1", "reannotation2"]].itertuples(index=False)}
        (conflicts if len(labels) > 1 else repeats).append((p, g))
    if conflicts:
        listing = "; ".join(
            f"{p} on lines " + ", ".join(f"{r.line} ({r.gold} {r.reannotation1} {r.reannotation2})"
                                         for r in g.itertuples(index=False))
            for p, g in conflicts[:5])
        more = f" (and {len(conflicts) - 5} more images)" if len(conflicts) > 5 else ""
        raise DataError(f"{path}: {len(conflicts)} image(s) listed more than once with different labels: "
                        f"{listing}{more}; keep one line per image")
    duplicates = [{"path": p, "lines": [int(x) for x in g["line"]]} for p, g in repeats]
    if duplicates:
        warnings.warn(f"{path}: {len(duplicates)} image(s) listed more than once with the same labels, e.g. "
                      f"{duplicates[0]['path']} on lines {duplicates[0]['lines']}; each is used once",
                      RuntimeWarning, stacklevel=2)
        df = df[~df["path"].duplicated(keep="first")].reset_index(drop=True)
    df = df.drop(columns="line")
    df.attrs["duplicates"] = duplicates
    return df


def _some(items: list, n: int = 10) -> str:
    """At most ``n`` items of a list for a message, with how many more there are."""
    return str(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def read_lmu(root: str | os.PathLike, annotations: str | os.PathLike | None = None) -> CellDataset:
    """Read the LMU layout, checking files against ``annotations.dat`` both ways."""
    root = Path(root)
    if root.is_file():
        annotations, root = root, root.parent
    ann_path = Path(annotations) if annotations else root / ANNOTATIONS_NAME
    ann = read_annotations(ann_path)
    on_disk = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and is_image_file(p)
    }
    listed = set(ann["path"])
    present = ann[ann["path"].isin(on_disk)]
    absent = ann[~ann["path"].isin(on_disk)]
    skipped, notes, rows = [], [], []
    for rel in sorted(on_disk - listed):
        skipped.append({"path": str(root / rel), "reason": f"image not listed in {ann_path.name}"})
    mismatched = 0
    for d in ann.attrs.get("duplicates", []):
        notes.append(f"{d['path']}: listed {len(d['lines'])} times in {ann_path.name} (lines "
                     f"{', '.join(map(str, d['lines']))}) with the same labels; used once")

    for rec in present.itertuples(index=False):
        folder = rec.path.split("/")[0]
        if folder in taxonomy.CLASSES and folder != rec.gold:
            mismatched += 1
            notes.append(f"{rec.path}: folder says {folder}, annotations.dat says {rec.gold}; the annotation is used")
        full = root / rec.path
        try:  # LMU crops cover ~29 µm whatever their pixel size (400 px in the real dataset)
            um_per_px = LMU_FIELD_UM / image_size(full)[0]
        except ImageError:
            um_per_px = LMU_UM_PER_PX  # unreadable header: check_images reports the file
        rows.append({
            "path": str(full.resolve()),
            "label": rec.gold,
            "patient": pd.NA,
            "source": "lmu",
            "um_per_px": um_per_px,
            "reannotation1": rec.reannotation1,
            "reannotation2": rec.reannotation2,
        })
    if len(absent):
        per_class = absent["gold"].value_counts()
        notes.insert(0, f"{ann_path.name} lists {len(ann)} images; {len(present)} are present, "
                        f"{len(absent)} are absent (a partial copy of the dataset?)")
    extra = {
        "annotations": {
            "path": str(ann_path),
            "n_listed": int(len(ann)),
            "n_present": int(len(present)),
            "n_absent": int(len(absent)),
            "n_not_listed": int(len(on_disk - listed)),
            "n_label_mismatch": mismatched,
            "listed_per_class": {c: int(v) for c, v in ann["gold"].value_counts().reindex(taxonomy.CLASSES, fill_value=0).items()},
            "absent_per_class": {c: int(per_class.get(c, 0)) for c in taxonomy.CLASSES} if len(absent) else {},
        }
    }
    return CellDataset(_frame(rows), "lmu", root.resolve(), skipped, notes, extra)


@register_reader("lmu", detect=_holds_lmu, priority=10)
def _read_lmu_layout(path: str | os.PathLike, label_map: Mapping[str, str] | None = None) -> CellDataset:
    """The LMU layout's labels are the taxonomy's own: a label map does not apply."""
    return read_lmu(path)


# ----------------------------------------------------------------------------- folders


@register_reader("folders", detect=_holds_class_folders, priority=90)
def read_folders(root: str | os.PathLike, label_map: Mapping[str, str] | None = None) -> CellDataset:
    """One sub-folder per class; the folder name is the label (or mapped through ``label_map``)."""
    root = Path(root)
    skipped, notes, rows = [], [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p))
        label = _resolve_label(d.name, label_map)
        if not files:
            notes.append(f"class folder {d.name}/ is empty: no images ({', '.join(IMAGE_SUFFIXES)})")
            continue
        if not label:
            for f in files:
                skipped.append({"path": str(f), "reason": f"folder {d.name!r} is mapped to no class"})
            continue
        if not taxonomy.is_class(label):
            raise DataError(
                f"{d}: unknown label {d.name!r} (folder name); expected one of {', '.join(taxonomy.CLASSES)} "
                "or give a label map (--label-map) that maps it"
            )
        for f in files:
            rows.append({"path": str(f.resolve()), "label": label, "patient": pd.NA,
                         "source": root.name, "um_per_px": np.nan})
    if not rows:
        raise DataError(f"{root}: no labelled images found in its class folders")
    return CellDataset(_frame(rows), "folders", root.resolve(), skipped, notes)


# ----------------------------------------------------------------------------- manifest


@register_reader("manifest", detect=_holds_manifest, priority=20)
def read_manifest(path: str | os.PathLike, label_map: Mapping[str, str] | None = None,
                  *, check_files: bool = True) -> CellDataset:
    """CSV ``path,label[,patient][,source][,um_per_px][,...]``; empty labels are skipped and counted, a stated
    ``um_per_px`` is checked (:func:`~leukoscope.imaging.scale_policy.check_um_per_px`, naming the line), an
    image listed twice is refused or used once (see the module docstring); an unreadable CSV is a
    :class:`DataError`."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in MANIFEST_NAMES if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no manifest ({' or '.join(MANIFEST_NAMES)})")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file in UTF-8 (byte {exc.start}): not a CSV manifest") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({str(exc).strip()[:200]})") from None
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {missing}; has {list(df.columns)}")
    base = path.parent
    skipped, notes, rows, unknown = [], [], [], {}
    n_empty = 0
    extra_cols = [c for c in df.columns if c not in ("path", "label", "patient", "source", "um_per_px")]
    lines: dict[str, list[tuple[int, dict]]] = {}
    for i, rec in enumerate(df.to_dict("records"), start=2):
        if not str(rec["path"]).strip() or "\x00" in str(rec["path"]):
            raise DataError(f"{path} line {i}: {'empty' if not str(rec['path']).strip() else 'invalid'} path")
        p = Path(rec["path"])
        full = p if p.is_absolute() else base / p
        label = _resolve_label(rec["label"], label_map)
        if not label:
            n_empty += 1  # counted, not listed: an empty label is the manifest's way to say "no class"
            continue
        if not taxonomy.is_class(label):
            unknown.setdefault(label, i)
            continue
        try:
            exists = full.exists()
            resolved = str(full.resolve())
        except OSError as exc:  # e.g. a name too long for the file system
            raise DataError(f"{path} line {i}: unusable path {str(rec['path'])[:100]!r} ({exc.strerror})") from None
        if check_files and not exists:
            skipped.append({"path": str(full), "reason": f"listed in {path.name} (line {i}) but file not found"})
            continue
        row = {"path": resolved, "label": label,
               "patient": rec.get("patient") or pd.NA,
               "source": rec.get("source") or base.name,
               "um_per_px": _stated_um_per_px(rec.get("um_per_px"), f"{path} line {i}: um_per_px")}
        for c in extra_cols:
            row[c] = rec[c]
        seen = lines.setdefault(row["path"], [])
        seen.append((i, row))
        if len(seen) == 1:
            rows.append(row)
    if unknown:
        listing = ", ".join(f"{lab!r} (line {ln})" for lab, ln in sorted(unknown.items()))
        raise DataError(
            f"{path}: unknown label(s) {listing}; expected one of {', '.join(taxonomy.CLASSES)}, "
            "an empty label to skip a row, or a label map (--label-map)"
        )
    if n_empty:
        notes.append(f"{n_empty} rows with an empty label skipped (no class of the taxonomy)")
    extra = {"manifest": str(path), "n_unlabelled": n_empty}
    if not rows:
        raise DataError(f"{path}: no usable labelled images")
    extra["duplicates"] = _manifest_duplicates(path, lines, notes)
    return CellDataset(_frame(rows), "manifest", base.resolve(), skipped, notes, extra)


def _manifest_duplicates(path: Path, lines: dict[str, list[tuple[int, dict]]], notes: list[str]) -> list[dict]:
    """Images a manifest lists more than once: refused (:class:`DataError` with the line numbers) when
    the rows differ; identical rows are used once, with a note and a ``RuntimeWarning``."""
    repeated = {p: seen for p, seen in lines.items() if len(seen) > 1}
    conflicts = {p: seen for p, seen in repeated.items()
                 if any(r != seen[0][1] for _, r in seen[1:])}
    if conflicts:
        listing = "; ".join(f"{p} on lines " + ", ".join(f"{i} ({r['label']})" for i, r in seen)
                            for p, seen in list(conflicts.items())[:5])
        more = f" (and {len(conflicts) - 5} more images)" if len(conflicts) > 5 else ""
        raise DataError(f"{path}: {len(conflicts)} image(s) listed more than once with different entries: "
                        f"{listing}{more}; keep one row per image")
    out = [{"path": p, "lines": [i for i, _ in seen]} for p, seen in repeated.items()]
    for d in out:
        notes.append(f"{d['path']}: listed {len(d['lines'])} times in {path.name} (lines "
                     f"{', '.join(map(str, d['lines']))}) with the same entries; used once")
    if out:
        warnings.warn(f"{path}: {len(out)} image(s) listed more than once with the same entries, e.g. "
                      f"{out[0]['path']} on lines {out[0]['lines']}; each is used once", RuntimeWarning, stacklevel=3)
    return out


# ----------------------------------------------------------------------------- entry


def read_dataset(path: str | os.PathLike, label_map: str | os.PathLike | Mapping[str, str] | None = None,
                 *, annotations: str | os.PathLike | None = None) -> CellDataset:
    """Read any registered layout (see the module docstring) into a :class:`CellDataset`.

    ``label_map`` (dict, JSON or CSV file) maps the dataset's own labels to LMU classes.
    ``annotations`` points at an ``annotations.dat`` elsewhere (LMU layout only).
    """
    mapping = read_label_map(label_map)
    if annotations:
        return read_lmu(path, annotations)
    return _READERS[detect_layout(path)].read(path, mapping)


def read_datasets(paths: Sequence[str | os.PathLike],
                  label_maps=None) -> CellDataset:
    """Read several datasets (several labs, say) into one :class:`CellDataset`.

    Each path is read by :func:`read_dataset`; ``label_maps`` is one label map for all datasets,
    or a list with one entry per path (``None`` for none). Each row keeps its dataset's
    ``source`` where it has one, else gets the dataset's folder name; where two datasets would
    give the same source name (two LMU-layout folders are both ``lmu``), that name is prefixed
    with each dataset's folder name (``labA:lmu``), so that labs stay apart for balanced
    sampling (``balance_by="source_class"``) and the scale estimate. A ``dataset`` column names
    the path each row came from. The same image in two datasets is refused (a ``ValueError``
    naming it and both datasets). ``layout`` is ``multi``, ``root`` the folders' common parent,
    ``extra['datasets']`` each dataset's summary.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("read_datasets: no dataset given")
    maps = list(label_maps) if isinstance(label_maps, (list, tuple)) else [label_maps] * len(paths)
    if len(maps) != len(paths):
        raise ValueError(f"read_datasets: {len(maps)} label maps for {len(paths)} datasets (give one per dataset, "
                         "None for none)")
    parts, roots, summaries, skipped, notes, seen, owners = [], [], [], [], [], {}, {}
    for path, label_map in zip(paths, maps):
        ds = read_dataset(path, label_map)
        roots.append(str(ds.root))
        summaries.append(ds.summary())
        table = ds.table.copy()
        empty = table["source"].isna() | (table["source"].astype(str).str.strip() == "")
        table.loc[empty, "source"] = ds.root.name
        table["dataset"] = str(path)
        for p in table["path"]:
            if p in seen:
                raise ValueError(f"{p}: the same image is in two datasets, {seen[p]} and {path}")
            seen[p] = path
        for src in table["source"].unique():
            owners.setdefault(src, []).append(len(parts))
        parts.append((ds.root.name, table))
        skipped += ds.skipped
        notes += [f"{ds.root}: {n}" for n in ds.notes]
    for src, owner in owners.items():
        if len(owner) > 1:
            for i in owner:
                name, table = parts[i]
                table.loc[table["source"] == src, "source"] = f"{name}:{src}"
            notes.append(f"source {src!r} comes from {len(owner)} datasets: named "
                         + ", ".join(f"{parts[i][0]}:{src}" for i in owner))
    table = _tidy(pd.concat([t for _, t in parts], ignore_index=True))
    return CellDataset(table, "multi", Path(os.path.commonpath(roots)), skipped, notes, {"datasets": summaries})


def check_images(ds: CellDataset, *, progress: bool = False) -> CellDataset:
    """Decode every image once; unusable ones move from the table to ``skipped``.

    Also records what the decoder met (modes, sizes, RGBA files and how many have
    alpha = 0 regions, which are dropped rather than composited, and ``dark_warnings``: images
    using under 1/8 of a wide sample type without a stated bit depth) in ``extra['images']``;
    the loader's warnings become one note.
    """
    keep, modes, sizes, rgba_with_transparency, dark = [], {}, {}, 0, []
    paths = list(ds.table["path"])
    iterator = paths
    if progress:
        iterator = tqdm(paths, desc="checking images", unit="img")
    for p in iterator:
        try:
            with warnings.catch_warnings(record=True) as caught:  # one note for all, not a warning per file
                warnings.simplefilter("always", RuntimeWarning)
                img = load_rgb(p)
            dark += [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            mode, transparent = stored_mode(p)
            rgba_with_transparency += int(transparent)
        except ImageError as exc:
            ds.skipped.append({"path": exc.path, "reason": exc.reason})
            keep.append(False)
            continue
        modes[mode] = modes.get(mode, 0) + 1
        key = f"{img.shape[1]}x{img.shape[0]}"
        sizes[key] = sizes.get(key, 0) + 1
        keep.append(True)
    ds.table = ds.table[np.array(keep, dtype=bool)].reset_index(drop=True)
    ds.extra["images"] = {
        "modes": modes,
        "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "rgba_with_transparent_pixels": rgba_with_transparency,
    }
    if modes.get("RGBA"):
        ds.notes.append(
            f"{modes['RGBA']} RGBA images: alpha dropped, RGB kept as stored (never composited onto black); "
            f"{rgba_with_transparency} of them have alpha = 0 regions"
        )
    if dark:
        ds.notes.append(f"{len(dark)} images use a small part of their sample range and will look dark, e.g. {dark[0]}")
    ds.extra["images"]["dark_warnings"] = len(dark)
    return ds


def as_path_list(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str | os.PathLike]:
    """``inputs`` as a list of paths: one ``str`` or ``PathLike`` is one path (never its characters, which
    would turn ``"/x.png"`` into scans of ``/`` and ``.``); an iterable of paths is listed. Bytes, numbers,
    non-path items and empty paths (``""`` would mean the working folder) raise ``ValueError``."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    elif isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Iterable):
        raise ValueError(f"expected a path or a list of paths (files or folders), got {type(inputs).__name__}")
    inputs = list(inputs)
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"expected paths (str or os.PathLike), got {item!r} ({type(item).__name__})")
        if not str(os.fspath(item)).strip():
            raise ValueError("an empty path ('') was given: name a file or folder ('.' for the working folder)")
    return inputs


def iter_image_paths(inputs: str | os.PathLike | Iterable[str | os.PathLike], *,
                     keep_empty_dirs: bool = False) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths; one path is taken as
    one (:func:`as_path_list`); ``keep_empty_dirs``: a folder without images stays in the list (so that
    the caller reports it as a bad input)."""
    out: list[Path] = []
    for item in as_path_list(inputs):
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            out.extend(found if (found or not keep_empty_dirs) else [p])
        else:
            out.append(p)
    return out
