"""The review database: one SQLite file, versioned, durable.

Opened in WAL mode with ``synchronous=FULL``: a transaction that has returned from
``COMMIT`` survives a killed process or a power cut. The schema version is SQLite's
``PRAGMA user_version``; :data:`MIGRATIONS` holds one step per version, applied in
order inside one transaction, so that an older database is brought up to date when
it is opened and a newer one (from a later LeukoScope) is refused rather than
misread.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

#: ``PRAGMA application_id`` of a LeukoScope review database ("LKRV").
APPLICATION_ID = 0x4C4B5256


class ReviewDatabaseError(ValueError):
    """A file that is not a usable review database; the message names the file and the problem."""


_V1 = """
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    source TEXT NOT NULL,            -- the screen output folder or the predictions CSV
    kind TEXT NOT NULL CHECK (kind IN ('screen', 'predict')),
    fingerprint TEXT NOT NULL,       -- SHA-256 of the run's cells.csv + summary.json (or the CSV)
    model_name TEXT,
    model_file TEXT,
    model_sha256 TEXT,
    classes TEXT NOT NULL,           -- JSON list: the model's classes
    scale TEXT NOT NULL,             -- JSON: µm/px per image and where it came from
    refer_below REAL,
    leukoscope_version TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE fields (
    image TEXT PRIMARY KEY,          -- the smear image as the run names it
    path TEXT NOT NULL,              -- where it was found at import (absolute)
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    um_per_px REAL,
    overview_factor REAL NOT NULL,   -- field px per overview px
    overview BLOB NOT NULL           -- PNG
);
CREATE TABLE cells (
    id INTEGER PRIMARY KEY,
    image TEXT NOT NULL,
    x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL, y1 INTEGER NOT NULL,
    cx REAL NOT NULL, cy REAL NOT NULL,                   -- the cell's centre (the model crop's centre)
    crop_x0 INTEGER NOT NULL, crop_y0 INTEGER NOT NULL,   -- the crop's origin in the field
    um_per_px REAL,
    model_pred TEXT NOT NULL,        -- the model's top class
    model_call TEXT NOT NULL,        -- what the run counted: model_pred, or unidentified when referred
    confidence REAL NOT NULL,
    top3 TEXT NOT NULL,              -- JSON [[class, calibrated probability], ...]
    p_blast REAL NOT NULL,
    referred INTEGER NOT NULL,
    crop BLOB NOT NULL               -- PNG at the image's native resolution
);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    signed INTEGER NOT NULL DEFAULT 0,
    reviewer TEXT, signed_at TEXT, specimen TEXT, comment TEXT
);
CREATE TABLE decisions (
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    round INTEGER NOT NULL REFERENCES rounds(round),
    label TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,   -- optimistic concurrency: +1 per change
    seen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cell_id, round)
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    round INTEGER NOT NULL,
    from_label TEXT NOT NULL,
    to_label TEXT NOT NULL,
    who TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX audit_cell ON audit(cell_id);
"""

_V2 = """
ALTER TABLE run ADD COLUMN ood TEXT;  -- JSON: the run's shift summary (flagged, total, warning), or NULL
"""

#: One entry per schema version: the SQL that brings version ``i`` to ``i + 1``.
MIGRATIONS: tuple[str, ...] = (_V1, _V2)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: str | os.PathLike, *, create: bool = False) -> sqlite3.Connection:
    """Open (or with ``create``, make) a review database, migrated to :data:`SCHEMA_VERSION`.

    Raises :class:`ReviewDatabaseError` for a missing file (without ``create``), a file
    that is not SQLite or not a review database, or a newer schema. Nothing is written
    to a file that is refused.
    """
    path = Path(path)
    if not create and not path.is_file():
        raise ReviewDatabaseError(f"{path}: review database not found")
    if create and path.exists():
        raise ReviewDatabaseError(f"{path}: already exists; not overwritten")
    if not create:
        _check_header(path)
    con = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        app = con.execute("PRAGMA application_id").fetchone()[0]
        if not create and (app != APPLICATION_ID or version == 0):
            raise ReviewDatabaseError(f"{path}: an SQLite file but not a LeukoScope review database")
        if version > SCHEMA_VERSION:
            raise ReviewDatabaseError(f"{path}: review database schema version {version} is newer than this "
                                      f"LeukoScope understands ({SCHEMA_VERSION}); update LeukoScope")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA foreign_keys=ON")
        if version < SCHEMA_VERSION:
            migrate(con, version)
        if not create:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise ReviewDatabaseError(f"{path}: the review database is damaged ({check})")
    except sqlite3.DatabaseError as exc:
        con.close()
        raise ReviewDatabaseError(f"{path}: not a readable review database (sqlite: {exc})") from None
    except BaseException:
        con.close()
        raise
    return con


def migrate(con: sqlite3.Connection, version: int) -> None:
    """Apply :data:`MIGRATIONS` from ``version`` up, all in one transaction."""
    con.execute("BEGIN IMMEDIATE")
    try:
        for step in MIGRATIONS[version:]:
            for stmt in step.split(";"):
                if stmt.strip():
                    con.execute(stmt)
        con.execute(f"PRAGMA application_id={APPLICATION_ID}")
        con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before sqlite3 touches it (it would create a WAL beside it)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head != b"SQLite format 3\x00":
        raise ReviewDatabaseError(f"{path}: not a review database (not an SQLite file; corrupt or another file)")
