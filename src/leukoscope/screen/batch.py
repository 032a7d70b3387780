"""Many scans in one run: one result folder per scan, a run index, resumable.

:func:`screen_batch` screens scans one after the other with a :class:`~leukoscope.screen.engine.ScreenEngine`
and writes, under ``out_dir``,

* ``<scan>/cells.csv``, ``<scan>/summary.json``, ``<scan>/review.html`` for each scan (the folder is
  named after the file, made unique with ``-2``, ``-3``, ... in the order given), with the scan's
  tile checkpoint in ``<scan>/checkpoint``;
* ``index.csv`` and ``index.json``: one row per scan (``scan``, ``status``, ``cells``, ``blast_pct``,
  ``folder``, ``tiles``, ``tiles_resumed``, ``um_per_px``, ``error``), rewritten atomically after
  every scan, so that an interrupted run leaves an index of what is done (the rest ``pending``).

``status`` is ``ok`` (screened in this run), ``resumed`` (finished from an earlier run's work: the
scan's results reused as they are, or its checkpointed tiles) or ``failed`` (with the reason in
``error``; the other scans are still screened). Run again with the same scans, engine settings and
``out_dir``, a batch skips the scans already finished (and, when a review page is wanted, written
with one) and resumes the interrupted one at its first unfinished tile; a scan whose file or engine
settings changed is screened afresh.

>>> from leukoscope.screen.engine import ScreenEngine     # doctest: +SKIP
>>> index = screen_batch(ScreenEngine(bundle), ["a.tif", "b.tif"], "out")  # doctest: +SKIP
>>> index[["scan", "status", "cells", "blast_pct"]]   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from leukoscope.io import atomic_write_csv, atomic_write_json
from leukoscope.screen.engine import ScreenEngine

INDEX_FORMAT = "leukoscope-screen-index/1"
#: Columns of ``index.csv``.
INDEX_COLUMNS = ["scan", "status", "cells", "blast_pct", "folder", "tiles", "tiles_resumed", "um_per_px", "error"]


def scan_folders(scans: Sequence[str | os.PathLike]) -> list[str]:
    """One folder name per scan: the file's stem (safe characters only), unique by ``-2``, ``-3``, ..."""
    names, seen = [], set()
    for s in scans:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(s).stem).strip("._") or "scan"
        name, k = base, 1
        while name.lower() in seen or name.lower() in ("index", "checkpoint"):
            k += 1
            name = f"{base}-{k}"
        seen.add(name.lower())
        names.append(name)
    return names


def scan_key(engine: ScreenEngine, scan: str | os.PathLike) -> str:
    """What an earlier result of ``scan`` must agree on to be reused: the file, the engine, the referral."""
    p = Path(scan)
    try:
        st = p.stat()
        ident = [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        ident = [str(p)]
    key = [ident, engine.fingerprint(), engine.refer_below, engine.um_per_px]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:16]


def read_index(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The run index of ``out_dir`` (empty when there is none or it cannot be read)."""
    path = Path(out_dir) / "index.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("scans", [])
    except (OSError, ValueError, AttributeError):
        rows = []
    return pd.DataFrame(rows, columns=INDEX_COLUMNS + ["key"])


def screen_batch(engine: ScreenEngine, scans: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 review: bool = True) -> pd.DataFrame:
    """Screen ``scans`` one by one into ``out_dir/<scan>/``; returns the run index (also in ``index.csv/json``).

    A scan that fails never stops the others; ``KeyboardInterrupt`` stops the run with the index
    and the interrupted scan's checkpoint written, ready to resume.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scans = [str(s) for s in scans]
    folders = scan_folders(scans)
    before = {r["scan"]: r for r in read_index(out).to_dict("records")}
    rows = [{"scan": s, "status": "pending", "cells": None, "blast_pct": None, "folder": f, "tiles": None,
             "tiles_resumed": None, "um_per_px": None, "error": None, "key": scan_key(engine, s)}
            for s, f in zip(scans, folders)]
    for row in rows:
        old = before.get(row["scan"])
        if (old is not None and old["status"] in ("ok", "resumed") and old["key"] == row["key"]
                and old["folder"] == row["folder"] and (out / row["folder"] / "summary.json").is_file()
                and (not review or (out / row["folder"] / "review.html").is_file())):
            row.update({k: old[k] for k in ("cells", "blast_pct", "tiles", "um_per_px")},
                       status="resumed", tiles_resumed=old["tiles"])
    _write_index(out, rows)
    for row in rows:
        if row["status"] != "pending":
            continue
        try:
            _screen_one(engine, row, out / row["folder"], review)
        except Exception as exc:  # one scan must not lose the others
            row.update(status="failed", error=f"{row['scan']}: {type(exc).__name__}: {exc}")
        _write_index(out, rows)
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def _screen_one(engine: ScreenEngine, row: dict, folder: Path, review: bool) -> None:
    result = engine.screen([row["scan"]], out_dir=folder)
    result.write(folder, bundle=engine.bundle, review=review)
    im = result.summary["images"][0]
    row.update(tiles=im["tiles"], tiles_resumed=im["tiles_resumed"], um_per_px=im["um_per_px"])
    if im["status"] != "ok":
        row.update(status="failed", error=im["error"])
        return
    row.update(status="resumed" if im["tiles_resumed"] else "ok", cells=im["cells_found"], blast_pct=im["blast_pct"])


def _write_index(out: Path, rows: list[dict]) -> None:
    atomic_write_json({"format": INDEX_FORMAT, "scans": rows}, out / "index.json")
    atomic_write_csv(pd.DataFrame(rows, columns=INDEX_COLUMNS), out / "index.csv")
