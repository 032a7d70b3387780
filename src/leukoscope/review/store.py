"""The review of one run as a plain library object: cells, crops, calls, decisions, differential.

:class:`ReviewStore` is what the web station (:mod:`leukoscope.review.app`) shows and
changes, and it works the same from a notebook:

>>> store = ReviewStore.open_or_create("screen_out")             # doctest: +SKIP
>>> cell = store.cells()[0]                                       # doctest: +SKIP
>>> store.reclassify(cell["id"], "MYO", "Dr A", cell["version"])  # doctest: +SKIP
>>> store.differential()["after"]["blast_pct"]                    # doctest: +SKIP

Every change is its own transaction, committed (WAL, ``synchronous=FULL``) before the
method returns. Each round of review keeps one decision per cell with a version
counter: a change that names an older version than the stored one is refused with
:class:`ConflictError` (two tabs, two reviewers), never applied over the other. A
signed round is read-only; :meth:`ReviewStore.new_round` starts the next one from its
calls and keeps it as it was.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from leukoscope import taxonomy
from leukoscope.review.importer import (ReviewInputError, build_database, default_db_path, now,
                                        run_fingerprint)
from leukoscope.review.labels import CLASS_ORDER, LABELS, NOT_COUNTED, check_label
from leukoscope.review.schema import ReviewDatabaseError, connect
from leukoscope.screen.count import UNIDENTIFIED, count_summary


class ConflictError(RuntimeError):
    """A change based on an outdated version of a decision (another tab or reviewer changed it first)."""


class ReadOnlyError(RuntimeError):
    """A change to a signed round."""


class SignOffError(RuntimeError):
    """Sign-off refused: cells not yet seen or still unidentified, or details missing."""


_CELL_COLUMNS = ("id", "image", "x0", "y0", "x1", "y1", "cx", "cy", "crop_x0", "crop_y0", "um_per_px", "model_pred",
                 "model_call", "confidence", "top3", "p_blast", "referred")


class ReviewStore:
    """One review database (see the module docstring). Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._con = connect(self.path)
        self._lock = threading.RLock()
        row = self._con.execute("SELECT * FROM run").fetchone()
        if row is None:
            self._con.close()
            raise ReviewDatabaseError(f"{self.path}: the review database has no run; it was not fully created")
        cols = [d[0] for d in self._con.execute("SELECT * FROM run").description]
        self.run = dict(zip(cols, row))
        self.run["classes"] = json.loads(self.run["classes"])
        self.run["scale"] = json.loads(self.run["scale"])
        self.run["ood"] = json.loads(self.run.get("ood") or "null")  # the run's shift summary, if it had one

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, source: str | os.PathLike, db: str | os.PathLike | None = None, **kwargs) -> "ReviewStore":
        """Import ``source`` (screen output or predictions CSV) into a new database (default ``SOURCE/review.sqlite``)."""
        db = Path(db) if db is not None else default_db_path(source)
        return cls(build_database(source, db, **kwargs))

    @classmethod
    def open_or_create(cls, source: str | os.PathLike, db: str | os.PathLike | None = None, **kwargs) -> "ReviewStore":
        """Reopen the review of ``source`` or start it. A database made from another run is refused."""
        db = Path(db) if db is not None else default_db_path(source)
        if not db.exists():
            return cls.create(source, db, **kwargs)
        store = cls(db)
        try:
            fp = run_fingerprint(source)
        except OSError as exc:
            store.close()
            raise ReviewInputError(f"{source}: cannot be read ({exc})") from None
        if fp != store.run["fingerprint"]:
            where = store.run["source"]
            store.close()
            raise ReviewDatabaseError(
                f"{db}: this review database belongs to another run ({where}, or that run was screened again); "
                f"{source} was not imported and the database was left as it is. Give another --db to start a new "
                "review, or open this one with 'leukoscope review --db FILE'")
        return store

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def _write(self):
        """One transaction, taken with the write lock and committed (durably) on leaving."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                yield self._con
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def _query(self, sql: str, args: Iterable = ()) -> list[dict]:
        with self._lock:
            cur = self._con.execute(sql, tuple(args))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    # ------------------------------------------------------------------ rounds

    def current_round(self) -> dict:
        """The latest round: ``{round, created, signed, reviewer, signed_at, specimen, comment}``."""
        return self._query("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")[0]

    def rounds(self) -> list[dict]:
        return self._query("SELECT * FROM rounds ORDER BY round")

    def signed_round(self, round_: int | None = None) -> dict:
        """A signed round (the latest, or ``round_``); a ``SignOffError`` when there is none."""
        rows = [r for r in self.rounds() if r["signed"] and (round_ is None or r["round"] == round_)]
        if not rows:
            which = f"round {round_}" if round_ is not None else "any round"
            raise SignOffError(f"{self.path}: {which} of this review is not signed off; sign off first")
        return rows[-1]

    def new_round(self, who: str) -> int:
        """Start a new round from the last signed one's calls (which stays as it was); returns its number."""
        with self._write() as con:
            cur = con.execute("SELECT round, signed FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
            if not cur[1]:
                raise ReadOnlyError(f"round {cur[0]} is still open; a new round starts after sign-off")
            nxt = cur[0] + 1
            con.execute("INSERT INTO rounds (round, created) VALUES (?, ?)", (nxt, now()))
            con.execute("INSERT INTO decisions (cell_id, round, label) SELECT cell_id, ?, label FROM decisions "
                        "WHERE round = ?", (nxt, cur[0]))
        return nxt

    # ------------------------------------------------------------------ cells

    def cells(self, round_: int | None = None, label: str | None = None) -> list[dict]:
        """Cells with their decision in ``round_`` (default the current one), in gallery order:
        grouped by reviewed call (unidentified first, then the classes, then the non-leukocytes),
        most blast-like first inside each group. ``top3`` is a list of ``[class, probability]``."""
        r = round_ if round_ is not None else self.current_round()["round"]
        rows = self._query(f"SELECT {', '.join('c.' + c for c in _CELL_COLUMNS)}, d.label, d.version, d.seen "
                           "FROM cells c JOIN decisions d ON d.cell_id = c.id AND d.round = ?", (r,))
        order = {lab: i for i, lab in enumerate(LABELS)}
        rows.sort(key=lambda c: (order.get(c["label"], len(order)), -c["p_blast"], c["id"]))
        for c in rows:
            c["top3"] = json.loads(c["top3"])
            c["referred"] = bool(c["referred"])
            c["seen"] = bool(c["seen"])
        return [c for c in rows if label is None or c["label"] == label]

    def cell(self, cell_id: int, round_: int | None = None) -> dict:
        r = round_ if round_ is not None else self.current_round()["round"]
        rows = self._query(f"SELECT {', '.join('c.' + c for c in _CELL_COLUMNS)}, d.label, d.version, d.seen "
                           "FROM cells c JOIN decisions d ON d.cell_id = c.id AND d.round = ? WHERE c.id = ?",
                           (r, int(cell_id)))
        if not rows:
            raise KeyError(f"no cell {cell_id} in this review")
        c = rows[0]
        c["top3"], c["referred"], c["seen"] = json.loads(c["top3"]), bool(c["referred"]), bool(c["seen"])
        return c

    def crop_png(self, cell_id: int) -> bytes:
        """The cell's crop (PNG, native resolution), looked up by id only."""
        with self._lock:
            row = self._con.execute("SELECT crop FROM cells WHERE id = ?", (int(cell_id),)).fetchone()
        if row is None:
            raise KeyError(f"no cell {cell_id} in this review")
        return bytes(row[0])

    def field(self, image: str) -> dict | None:
        """A smear field: ``{image, path, width, height, um_per_px, overview_factor, overview}`` (PNG), or None."""
        rows = self._query("SELECT * FROM fields WHERE image = ?", (image,))
        return rows[0] if rows else None

    # ------------------------------------------------------------------ decisions

    def _open_round(self, con: sqlite3.Connection) -> int:
        r, signed = con.execute("SELECT round, signed FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        if signed:
            raise ReadOnlyError(f"round {r} is signed off and read-only; start a new round to change a call")
        return r

    def reclassify(self, cell_id: int, label: str, who: str, expected_version: int) -> dict:
        """Set the reviewed call of a cell; refused when the stored version is not ``expected_version``.

        The cell counts as seen. Returns the new decision ``{cell_id, label, version, from}``;
        a change to the same label is a no-op (no version step, no audit line).
        """
        check_label(label)
        who = _who(who)
        with self._write() as con:
            r = self._open_round(con)
            row = con.execute("SELECT label, version FROM decisions WHERE cell_id = ? AND round = ?",
                              (int(cell_id), r)).fetchone()
            if row is None:
                raise KeyError(f"no cell {cell_id} in this review")
            old, version = row
            if int(expected_version) != version:
                raise ConflictError(f"cell {cell_id} was changed meanwhile (now {old}, version {version}; "
                                    f"your change was based on version {expected_version}): reload and decide again")
            if old == label:
                con.execute("UPDATE decisions SET seen = 1 WHERE cell_id = ? AND round = ?", (int(cell_id), r))
                return {"cell_id": int(cell_id), "label": label, "version": version, "from": old}
            con.execute("UPDATE decisions SET label = ?, version = version + 1, seen = 1 WHERE cell_id = ? AND round = ?",
                        (label, int(cell_id), r))
            con.execute("INSERT INTO audit (cell_id, round, from_label, to_label, who, at) VALUES (?,?,?,?,?,?)",
                        (int(cell_id), r, old, label, who, now()))
        return {"cell_id": int(cell_id), "label": label, "version": version + 1, "from": old}

    def mark_seen(self, cell_ids: Iterable[int]) -> int:
        """Mark cells of the open round as seen; returns how many were newly seen."""
        ids = [int(i) for i in cell_ids]
        with self._write() as con:
            r = self._open_round(con)
            n = 0
            for i in ids:
                n += con.execute("UPDATE decisions SET seen = 1 WHERE cell_id = ? AND round = ? AND seen = 0",
                                 (i, r)).rowcount
        return n

    def audit(self, cell_id: int | None = None) -> list[dict]:
        """Every change: ``{id, cell_id, round, from_label, to_label, who, at}``, oldest first."""
        if cell_id is None:
            return self._query("SELECT * FROM audit ORDER BY id")
        return self._query("SELECT * FROM audit WHERE cell_id = ? ORDER BY id", (int(cell_id),))

    # ------------------------------------------------------------------ counts

    def progress(self, round_: int | None = None) -> dict:
        """``{cells, seen, unseen, unidentified}`` of a round."""
        cells = self.cells(round_)
        return {"cells": len(cells), "seen": sum(c["seen"] for c in cells),
                "unseen": sum(not c["seen"] for c in cells),
                "unidentified": sum(c["label"] == UNIDENTIFIED for c in cells)}

    def differential(self, round_: int | None = None) -> dict:
        """Counts before review (the run's calls) and after (the reviewed calls), by
        :func:`leukoscope.screen.count.count_summary` with every class (zero included);
        cells reviewed as not a leukocyte or artefact are left out of the count and listed apart."""
        cells = self.cells(round_)
        classes = list(taxonomy.CLASSES)
        before = count_summary([c["model_call"] for c in cells], [c["p_blast"] for c in cells], classes)
        kept = [c for c in cells if c["label"] not in NOT_COUNTED]
        after = count_summary([c["label"] for c in kept], [c["p_blast"] for c in kept], classes)
        excluded = {lab: sum(c["label"] == lab for c in cells) for lab in NOT_COUNTED}
        changed = sum(c["label"] != c["model_call"] for c in cells)
        return {"before": before, "after": after, "excluded": excluded, "changed": changed,
                "order": list(CLASS_ORDER)}

    # ------------------------------------------------------------------ sign-off

    def sign_off(self, reviewer: str, specimen: str, comment: str = "") -> dict:
        """Sign the open round: every cell seen, none unidentified, a reviewer and a specimen named.
        Afterwards the round is read-only. Returns the signed round."""
        reviewer, specimen = (reviewer or "").strip(), (specimen or "").strip()
        if not reviewer:
            raise SignOffError("sign-off needs the reviewer's name")
        if not specimen:
            raise SignOffError("sign-off needs the specimen/sample identifier")
        with self._write() as con:
            r = self._open_round(con)
            unseen, unid = con.execute(
                "SELECT SUM(seen = 0), SUM(label = ?) FROM decisions WHERE round = ?", (UNIDENTIFIED, r)).fetchone()
            unseen, unid = int(unseen or 0), int(unid or 0)
            if unseen or unid:
                parts = ([f"{unseen} cell(s) not yet seen"] if unseen else []) + \
                        ([f"{unid} cell(s) still unidentified (assign each a class or an outcome)"] if unid else [])
                raise SignOffError("sign-off refused: " + "; ".join(parts))
            con.execute("UPDATE rounds SET signed = 1, reviewer = ?, signed_at = ?, specimen = ?, comment = ? "
                        "WHERE round = ?", (reviewer, now(), specimen, (comment or "").strip(), r))
        return self.current_round()

    # ------------------------------------------------------------------ summary

    def model_record(self) -> dict:
        return {"name": self.run["model_name"], "file": self.run["model_file"], "sha256": self.run["model_sha256"]}

    def scale_text(self) -> str:
        """The µm/px used, in words (one value per image when they differ)."""
        sc = self.run["scale"]
        if self.run["kind"] == "predict":
            return f"{sc['all']:g} µm/px ({sc['source']})" if sc.get("all") else sc.get("source", "unknown")
        vals = {k: v for k, v in sc.get("images", {}).items()}
        srcs = sc.get("sources", {})
        if not vals:
            return "unknown"
        return "; ".join(f"{Path(k).name}: {v:.4f} µm/px ({srcs.get(k) or 'unknown'})" if v else f"{Path(k).name}: unknown"
                         for k, v in vals.items())


def _who(who) -> str:
    who = (who or "").strip() if isinstance(who, str) else ""
    if not who:
        raise ValueError("a change needs the reviewer's name")
    return who[:200]

