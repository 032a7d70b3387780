"""``make_report``: from a cross-validation run folder to tables, figures, JSON and one HTML page.

Reads ``RUN/predictions.csv`` (and ``RUN/config.json``, ``RUN/fold{K}/model.safetensors``
when present) and writes into the output folder, each file atomically:

``table1.csv``, ``confusion.csv``, ``binary.json``, ``metrics.json``, ``confusion.png``,
``roc_blast.png``, ``roc_atypical.png``, ``reliability.png``, ``saliency/*.png`` and
``report.html`` (one self-contained page, images embedded).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from leukoscope import INTENDED_USE, __version__, taxonomy
from leukoscope.evaluate import binary as binary_mod
from leukoscope.evaluate import calibration, metrics
from leukoscope.evaluate.agreement import agreement, examiner_points, read_annotations
from leukoscope.evaluate.saliency import saliency_examples
from leukoscope.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text
from leukoscope.progress import tqdm
from leukoscope.report import figures
from leukoscope.report.html import render_report

EXAMINER_LABELS = {"reannotation1": "examiner 1", "reannotation2": "examiner 2"}
SALIENCY_DIR = "saliency"
_SALIENCY_NAME = re.compile(r"^[A-Z]{3}_\d+_(correct|wrong)\.png$")


def clean_json(obj):
    """``obj`` with NaN and infinities as ``None`` and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _find_fingerprint(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if "fingerprint" in str(k).lower():
                return v
        for v in node.values():
            found = _find_fingerprint(v)
            if found is not None:
                return found
    elif isinstance(node, list):
        for v in node:
            found = _find_fingerprint(v)
            if found is not None:
                return found
    return None


def read_run_config(run_dir: Path) -> tuple[dict | None, object]:
    """``RUN/config.json`` (or ``None``) and the data fingerprint found in it (or ``None``)."""
    path = run_dir / "config.json"
    if not path.exists():
        return None, None
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return conf, _find_fingerprint(conf)


def human_comparison(pred_df: pd.DataFrame, annotations: str | os.PathLike) -> dict:
    """Examiners on the whole annotation file (the ROC points) and model vs examiners on shared images."""
    ann = read_annotations(annotations)
    res = agreement(ann)
    points = {q: examiner_points(res, q) for q in taxonomy.BINARY_QUESTIONS}
    return {
        "annotations": str(annotations),
        "agreement": res,
        "points": points,
        "model_vs_examiners": metrics.model_vs_examiners(pred_df, ann),
    }


def _examiner_plot_points(human: dict | None, question: str) -> list[dict]:
    if not human:
        return []
    out = []
    for p in human["points"][question]:
        n = human["agreement"][p["examiner"]]["n_assignable"]
        k = p["kappa"]
        kap = f"κ = {k:.3f}" if k is not None and np.isfinite(k) else "κ n/a"
        out.append({"label": f"{EXAMINER_LABELS.get(p['examiner'], p['examiner'])} ({kap} on {n} images)",
                    "fpr": p["fpr"], "tpr": p["tpr"]})
    return out


def _examiner_footnote(human: dict | None) -> str | None:
    """Which images the examiners' ROC points describe, when they are not the model's test images."""
    if not human:
        return None
    mv = human["model_vs_examiners"]
    name = Path(human["annotations"]).name
    if mv["n_matched"] == 0:
        return (f"Examiners' points: the re-annotated images of {name}, none of which is in this test set "
                "(a reference, not a comparison on the same cells).")
    return (f"Examiners' points: all re-annotated images of {name}; {mv['n_matched']} of this test set's "
            f"{mv['n_predictions']} images are in that file (see the human comparison).")


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _table1_groups(t1: pd.DataFrame) -> list[dict]:
    groups = []
    for g, members in taxonomy.GROUPS.items():
        rows = [r for r in t1.to_dict("records") if r["class"] in members]
        # the paper's order within a group
        rows.sort(key=lambda r: members.index(r["class"]))
        if rows:
            groups.append({"name": g, "rows": rows})
    return groups


def _write_saliency(examples: list[dict], out_dir: Path) -> list[dict]:
    sal_dir = out_dir / SALIENCY_DIR
    written, counters = [], {}
    for e in examples:
        kind = "correct" if e["correct"] else "wrong"
        counters[e["label"]] = counters.get(e["label"], 0) + 1
        name = f"{e['label']}_{counters[e['label']]}_{kind}.png"
        prob = f", p = {e['prob']:.2f}" if np.isfinite(e["prob"]) else ""
        title = (f"gold {e['label']} → predicted {e['pred']}{prob} ({kind}, fold {e['fold']})\n"
                 f"{metrics.path_key(e['path'])}")
        png = figures.saliency_png(e["image"], e["saliency"], title)
        atomic_write_bytes(png, sal_dir / name)
        written.append({"file": f"{SALIENCY_DIR}/{name}", "path": e["path"], "label": e["label"], "pred": e["pred"],
                        "fold": e["fold"], "correct": e["correct"], "prob": e["prob"], "png": png})
    # remove maps of an earlier report that this one did not rewrite
    keep = {Path(w["file"]).name for w in written}
    if sal_dir.is_dir():
        for f in sal_dir.iterdir():
            if _SALIENCY_NAME.match(f.name) and f.name not in keep:
                f.unlink()
    return written


def check_predictions_complete(run_dir: str | os.PathLike, pred: pd.DataFrame) -> list[str]:
    """Refuse a ``predictions.csv`` that is not the whole of its run; return notes for what cannot be checked.

    The run's ``cv_summary.json`` records how many images were predicted (``n``): another row count
    (a file cut at a line boundary, or edited) raises :class:`ValueError`. Every predicted path must
    be in the run's ``split.csv`` (matched on :func:`~leukoscope.evaluate.metrics.path_key`), and no more
    rows than it has."""
    run_dir = Path(run_dir)
    file = run_dir / "predictions.csv"
    notes: list[str] = []
    summary_file = run_dir / "cv_summary.json"
    if summary_file.exists():
        try:
            n_run = int(json.loads(summary_file.read_text(encoding="utf-8"))["n"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{summary_file}: unreadable ({exc}); rerun 'leukoscope cv' with the same --out") from None
        if n_run != len(pred):
            raise ValueError(f"{file} has {len(pred)} rows but the run predicted {n_run} images ({summary_file}): "
                             "the file is truncated or was edited; rerun 'leukoscope cv' with the same --out "
                             "to rewrite it (finished folds are kept)")
    else:
        notes.append(f"no {summary_file.name} in {run_dir}: the number of predictions could not be checked")
    split_file = run_dir / "split.csv"
    if split_file.exists():
        split = pd.read_csv(split_file, dtype={"path": str}, usecols=["path"])
        extra = sorted(set(pred["path"].map(metrics.path_key)) - set(split["path"].astype(str).map(metrics.path_key)))
        if extra or len(pred) > len(split):
            raise ValueError(f"{file} does not match {split_file}: {len(extra)} predicted images are not in the "
                             f"split (e.g. {extra[0] if extra else '-'}), {len(pred)} rows for {len(split)} split "
                             "rows; rerun 'leukoscope cv' with the same --out")
    return notes


def make_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                annotations: str | os.PathLike | None = None, saliency_per_class: int = 2,
                n_boot: int = 1000, seed: int = 0, n_bins: int = 15, device: str = "cpu",
                progress: bool = False, banner: str | None = None) -> dict:
    """Evaluate a cross-validation run and write the report files; returns what ``metrics.json`` holds.

    ``run_dir`` holds ``predictions.csv`` (``path,label,fold,pred,prob_<CLASS>...``);
    ``out_dir`` defaults to ``RUN/report``. ``annotations``: an LMU ``annotations.dat``
    for the human comparison. ``saliency_per_class=0`` skips saliency maps;
    ``n_boot=0`` skips bootstrap intervals. ``device``: where the fold models run (saliency maps);
    ``progress``: a progress display over the report's steps (:mod:`leukoscope.progress`). ``banner``: a
    line shown first on the page, right under the title (the demo's "these data are synthetic").
    """
    for name, v, least in (("n_boot", n_boot, 0), ("saliency_per_class", saliency_per_class, 0), ("n_bins", n_bins, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, got {v!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir}: not a run folder")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    bar = tqdm(total=4, desc="report", unit="step", disable=not progress)
    pred = metrics.read_predictions(run_dir / "predictions.csv")
    notes: list[str] = check_predictions_complete(run_dir, pred)
    model_classes = metrics.model_classes(pred)
    classes = metrics.report_classes(pred, model_classes)
    only_gold = [c for c in classes if c not in model_classes]
    if only_gold:
        notes.append(f"gold labels the model cannot predict (not among its classes): {', '.join(only_gold)}")
    no_images = [c for c in model_classes if c not in set(pred["label"])]
    if no_images:
        notes.append(f"model classes with no test image (sensitivity undefined): {', '.join(no_images)}")

    fold_metrics = metrics.per_class_fold_metrics(pred, classes)
    t1 = metrics.table1(pred, classes, fold_metrics)
    bar.update(1)
    overall = metrics.overall_metrics(pred, classes, n_boot=n_boot, seed=seed)
    bar.update(1)
    conf = metrics.confusion_fractions(pred, classes)
    cal = calibration.calibration_of_predictions(pred, n_bins=n_bins)
    binary = binary_mod.binary_questions(pred, model_classes)
    human = human_comparison(pred, annotations) if annotations else None
    config, fingerprint = read_run_config(run_dir)

    examples, sal_notes = saliency_examples(run_dir, pred, per_class=saliency_per_class, seed=seed, device=device)
    bar.update(1)

    # ---- figures
    pngs = {
        "confusion": figures.confusion_png(classes, conf[classes].to_numpy(), conf["n_images"].to_numpy()),
        "reliability": figures.reliability_png(cal),
    }
    for q, res in binary.items():
        title = {"blast": "Blast cells (MYO + MOB) vs. all other cells",
                 "atypical": "Atypical cells vs. cells of a healthy smear"}.get(q, q)
        pngs[f"roc_{q}"] = figures.roc_png(res, title, _examiner_plot_points(human, q), _examiner_footnote(human))
    for name, png in pngs.items():
        atomic_write_bytes(png, out_dir / f"{name}.png")
    saliency = _write_saliency(examples, out_dir)

    # ---- tables and JSON
    atomic_write_csv(t1, out_dir / "table1.csv")
    atomic_write_csv(conf.reset_index(), out_dir / "confusion.csv")
    binary_json = {}
    for q, res in binary.items():
        entry = {k: v for k, v in res.items() if k not in ("fpr_grid", "tpr_mean", "tpr_sd")}
        entry["folds"] = [{k: v for k, v in f.items() if k != "tpr_grid"} for f in res["folds"]]
        entry["mean_curve"] = {k: res[k] for k in ("fpr_grid", "tpr_mean", "tpr_sd") if k in res}
        if human:
            entry["examiners"] = human["points"][q]
        binary_json[q] = entry
    atomic_write_json(clean_json(binary_json), out_dir / "binary.json")

    files = (["table1.csv", "confusion.csv", "binary.json", "metrics.json"] + [f"{n}.png" for n in pngs]
             + [s["file"] for s in saliency] + ["report.html"])
    result = {
        "leukoscope_version": __version__,
        "intended_use": INTENDED_USE,
        "banner": banner,
        "run": {"dir": str(run_dir), "predictions": str(run_dir / "predictions.csv"), "n_images": int(len(pred)),
                "folds": sorted(int(f) for f in pred["fold"].unique()), "model_classes": model_classes,
                "classes": classes, "data_fingerprint": fingerprint, "config": config},
        "notes": notes,
        "table1": t1.to_dict("records"),
        "per_class_per_fold": fold_metrics.to_dict("records"),
        "overall": overall,
        "confusion": {"classes": classes, "n_images": conf["n_images"].tolist(),
                      "fractions": conf[classes].to_numpy().tolist()},
        "calibration": cal,
        "binary": binary_json,
        "human": human,
        "saliency": {"per_class": int(saliency_per_class), "notes": sal_notes,
                     "examples": [{k: v for k, v in s.items() if k != "png"} for s in saliency]},
        "files": files,
    }
    result = clean_json(result)
    atomic_write_json(result, out_dir / "metrics.json")

    # ---- the page
    context = {
        "r": result,
        "table1_groups": _table1_groups(t1),
        "f1_rows": [{"class": c, "name": taxonomy.CLASS_NAMES[c], **result["overall"]["f1"][c],
                     "n_images": int(conf.loc[c, "n_images"])} for c in classes],
        "images": {k: _b64(v) for k, v in pngs.items()},
        "saliency": [{**{k: v for k, v in s.items() if k != "png"}, "b64": _b64(s["png"])} for s in saliency],
        "examiner_labels": EXAMINER_LABELS,
        "config_json": json.dumps(clean_json(config), indent=2) if config is not None else None,
        "fingerprint_json": (json.dumps(clean_json(fingerprint), indent=2)
                             if fingerprint is not None and not isinstance(fingerprint, str) else fingerprint),
    }
    bar.update(1)
    bar.close()
    atomic_write_text(render_report(context), out_dir / "report.html")
    return result
