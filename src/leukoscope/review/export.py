"""What leaves the review: the signed differential and the reviewed cells as a dataset.

:func:`export_differential` writes ``differential.csv`` (one row per class, the
non-leukocyte outcomes and the blasts), ``differential.json`` and a printable one-page
``report.html`` of a signed round; :func:`export_labels` writes the reviewed cells as
a labelled single-cell dataset (``cells/<LABEL>/cell_<id>.png`` + ``labels.csv`` with
``path,label,patient,source,um_per_px``) that :func:`leukoscope.data.read_dataset`
reads, so a lab's corrections become its own training and validation data. Every
file is written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from leukoscope import INTENDED_USE, __version__
from leukoscope.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text
from leukoscope.review.labels import CLASS_ORDER, NOT_COUNTED, label_name
from leukoscope.screen.count import UNIDENTIFIED

TEMPLATES = Path(__file__).resolve().parent / "templates"


def templates() -> Environment:
    """The Jinja2 environment of the review's pages (autoescaped)."""
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = _pct
    return env


def _pct(x, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * float(x):.{nd}f}%"


def differential_record(store, round_: int | None = None, *, signed: bool = True) -> dict:
    """The differential of a round with everything the export names: specimen, reviewer, time,
    LeukoScope version, model name and SHA-256, scale, counts before and after review, blast % with CI.
    ``signed``: the latest signed round (or ``round_``, which must be signed); else the current round."""
    rnd = store.signed_round(round_) if signed else (store.current_round() if round_ is None else
                                                      next(r for r in store.rounds() if r["round"] == round_))
    diff = store.differential(rnd["round"])
    before, after = diff["before"], diff["after"]
    rows = []
    for c in CLASS_ORDER:
        a = after["differential"][c]
        rows.append({"class": c, "name": label_name(c), "n_before": before["differential"][c]["n"], "n_after": a["n"],
                     "fraction_after": a["fraction"], "ci_low": a["ci"][0], "ci_high": a["ci"][1]})
    rows.append({"class": UNIDENTIFIED, "name": label_name(UNIDENTIFIED), "n_before": before["unidentified"],
                 "n_after": after["unidentified"], "fraction_after": None, "ci_low": None, "ci_high": None})
    for lab in NOT_COUNTED:
        rows.append({"class": lab, "name": label_name(lab), "n_before": 0, "n_after": diff["excluded"][lab],
                     "fraction_after": None, "ci_low": None, "ci_high": None})
    return {
        "intended_use": INTENDED_USE,
        "specimen": rnd["specimen"], "reviewer": rnd["reviewer"], "signed_at": rnd["signed_at"],
        "signed": bool(rnd["signed"]), "comment": rnd["comment"], "round": rnd["round"],
        "leukoscope_version": __version__,
        "model": store.model_record(), "scale": store.scale_text(), "source": store.run["source"],
        "run_kind": store.run["kind"], "run_fingerprint": store.run["fingerprint"],
        "cells_reviewed": before["cells_found"], "calls_changed": diff["changed"],
        "rows": rows,
        "before": {k: before[k] for k in ("cells_found", "identified", "unidentified", "blast_pct", "blast_pct_ci",
                                          "flag_text", "blasts")},
        "after": {k: after[k] for k in ("cells_found", "identified", "unidentified", "blast_pct", "blast_pct_ci",
                                        "interval", "flags", "flag_text", "blasts")},
    }


def differential_table(rec: dict) -> pd.DataFrame:
    """``differential.csv``: one row per label and one for the blasts, each with the run's identity."""
    head = {"specimen": rec["specimen"], "reviewer": rec["reviewer"], "signed_at": rec["signed_at"],
            "round": rec["round"], "leukoscope_version": rec["leukoscope_version"],
            "model_name": rec["model"]["name"], "model_sha256": rec["model"]["sha256"], "scale": rec["scale"]}
    rows = [{**head, **r} for r in rec["rows"]]
    a, b = rec["after"], rec["before"]
    rows.append({**head, "class": "blasts (MYO+MOB)", "name": "Blast percentage of identified leukocytes",
                 "n_before": b["blasts"]["n"],
                 "n_after": a["blasts"]["n"], "fraction_after": a["blasts"]["fraction"],
                 "ci_low": a["blasts"]["ci"][0], "ci_high": a["blasts"]["ci"][1]})
    return pd.DataFrame(rows)


def render_report(rec: dict) -> str:
    """The printable one-page HTML report of a differential record."""
    return templates().get_template("report.html").render(rec=rec)


def export_differential(store, out: str | os.PathLike, round_: int | None = None) -> dict[str, Path]:
    """Write ``differential.csv``, ``differential.json`` and ``report.html`` of a signed round into ``out``."""
    rec = differential_record(store, round_)
    out = Path(out)
    return {"csv": atomic_write_csv(differential_table(rec), out / "differential.csv"),
            "json": atomic_write_json(rec, out / "differential.json"),
            "html": atomic_write_text(render_report(rec), out / "report.html")}


def export_labels(store, out: str | os.PathLike, round_: int | None = None) -> dict:
    """Write the reviewed cells of a signed round as a labelled dataset in ``out``.

    Cells reviewed as unidentified, not a leukocyte or artefact are left out and counted.
    Returns ``{"labels": path, "written": n, "left_out": {label: n}}``.
    """
    rnd = store.signed_round(round_)
    out = Path(out)
    source = f"review:{Path(store.run['source']).name}"
    rows, left_out = [], {UNIDENTIFIED: 0, **{lab: 0 for lab in NOT_COUNTED}}
    for c in sorted(store.cells(rnd["round"]), key=lambda c: c["id"]):
        if c["label"] in left_out:
            left_out[c["label"]] += 1
            continue
        rel = f"cells/{c['label']}/cell_{c['id']:06d}.png"
        atomic_write_bytes(store.crop_png(c["id"]), out / rel)
        rows.append({"path": rel, "label": c["label"], "patient": rnd["specimen"], "source": source,
                     "um_per_px": c["um_per_px"] if c["um_per_px"] else "", "model_call": c["model_call"],
                     "cell_id": c["id"], "image": c["image"]})
    if not rows:
        raise ValueError(f"{store.path}: no reviewed leukocyte to export (all {sum(left_out.values())} cells were "
                         "unidentified, not leukocytes or artefacts)")
    path = atomic_write_csv(pd.DataFrame(rows), out / "labels.csv")
    return {"labels": path, "written": len(rows), "left_out": left_out}
