"""Scoring a trained bundle on other labs' cells: per source, per class, with an out-of-distribution check.

The question of issue 7: does a model trained on one lab's cells work on another lab's?
:func:`evaluate_sets` answers it for any labelled set (any reader layout):

1. **rows**: every labelled image; cells of classes the model does not know are counted
   per source and left out of the metrics (a PBC model cannot be right about a blast);
2. **scale**: each image is brought to the model's µm/px — the user's ``um_per_px``,
   else the table's, else estimated per source from the red cells
   (the scale policy, :class:`leukoscope.imaging.scale_policy.ScalePolicy`); a model without a physical
   scale resizes, as at training;
3. **colour** (optional): Reinhard stain normalisation onto the reference the bundle
   stores (:func:`leukoscope.imaging.colour.normalize_stain`);
4. **metrics** per source with the report's own functions
   (:mod:`leukoscope.evaluate.metrics`: accuracy, balanced accuracy, macro-F1 with
   bootstrap intervals; per-class sensitivity, precision, F1);
5. **out-of-distribution warning** per source, against a reference stored in the
   bundle (:func:`leukoscope.models.ood.fit_reference`, computed on in-distribution cells the model was not
   trained on): the penultimate-layer features (Mahalanobis distance to the nearest
   class mean in a whitened PCA space, Lee et al. 2018), the image colour (CIELAB of
   light pixels and of nuclei, Mahalanobis distance), and the drop in mean
   max-probability. A source whose cells lie beyond the reference's 95th-percentile
   distance far more often than 5% of the time, or whose confidence drops clearly,
   gets a warning line. Each cell also gets the per-cell ``ood_score``/``ood_flag`` of ``predict`` and
   ``screen`` (:func:`leukoscope.models.ood.score_cells`), summed up per source under ``ood[source]["cells"]``.

>>> from leukoscope.models.bundle import load_bundle
>>> from leukoscope.data import read_dataset
>>> b = load_bundle("runs/pbc/model.safetensors")                              # doctest: +SKIP
>>> res = evaluate_sets(b, [read_dataset("../shared/data/aml_lmu_sample").table])  # doctest: +SKIP
>>> res.per_source["lmu"]["accuracy"]["value"], res.warnings                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from leukoscope.data.splits import stratified_val_split
from leukoscope.evaluate.metrics import overall_metrics, per_class_fold_metrics
from leukoscope.evaluate.predictions import predictions_table, write_table
from leukoscope.imaging.scale_policy import ScalePolicy, check_um_per_px
from leukoscope.io import atomic_write_csv, atomic_write_json
from leukoscope.models.inference import forward, nonfinite_errors
from leukoscope.models.ood import (REFERENCE_KEY, colour_basis, ood_check, ood_summary, prepare_images,
                                   score_cells)



@dataclass
class EvaluationResult:
    predictions: pd.DataFrame            # path,label,fold,pred,prob_<C>...,source,known,max_prob,ood_score,...
    per_source: dict                     # source -> metrics (report's overall_metrics) + counts
    per_class: pd.DataFrame              # source,class,n_true,n_pred,sensitivity,precision,f1
    ood: dict                            # source -> OOD statistics and "warning" (or None)
    scale: dict                          # how µm/px was decided, per source
    warnings: list = field(default_factory=list)
    errors: list = field(default_factory=list)     # unreadable images: {"path", "reason"}
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"settings": self.settings, "per_source": self.per_source, "ood": self.ood, "scale": self.scale,
                "warnings": list(self.warnings), "errors": list(self.errors)}


# --------------------------------------------------------------------------- rows


def group_labels(table: pd.DataFrame, group_by: str = "source") -> pd.Series:
    """The group of each row: its ``source`` column, or the parent folder name of its image (``folder``)."""
    if group_by == "source":
        if "source" not in table:
            return pd.Series(["all"] * len(table), index=table.index)
        return table["source"].fillna("unknown").astype(str)
    if group_by == "folder":
        return table["path"].map(lambda p: Path(str(p)).parent.name)
    raise ValueError(f"group_by must be 'source' or 'folder', got {group_by!r}")


def combine_tables(tables: Sequence[pd.DataFrame], group_by: str = "source") -> pd.DataFrame:
    """One table of several datasets with a ``group`` column; an image listed twice is kept once."""
    parts = []
    for t in tables:
        t = t.copy()
        t["group"] = group_labels(t, group_by).to_numpy()
        parts.append(t)
    if not parts:
        raise ValueError("no datasets to evaluate")
    df = pd.concat(parts, ignore_index=True)
    if "um_per_px" not in df:
        df["um_per_px"] = np.nan
    return df.drop_duplicates("path", keep="first").reset_index(drop=True)


# --------------------------------------------------------------------------- evaluation


def evaluate_sets(bundle, tables: Sequence[pd.DataFrame] | pd.DataFrame, *, group_by: str = "source",
                  um_per_px: float | None = None, estimate_scale: str = "group", stain_normalize: bool = False,
                  stain_target: dict | None = None, n_boot: int = 1000, seed: int = 0,
                  batch_size: int = 64, tta: bool = False, progress: bool = False) -> EvaluationResult:
    """Score ``bundle`` on labelled tables, per group (``source`` column or image ``folder``) and per class.

    ``tta``: probabilities averaged over the 8 rotations by 90° and mirror images of each cell
    (the OOD check keeps the plain view's features and confidence, as its reference was fitted).
    ``progress``: a progress display over the forward pass (:mod:`leukoscope.progress`)."""
    if um_per_px is not None:
        um_per_px = check_um_per_px(um_per_px, "evaluate_sets(um_per_px=...)")
    if isinstance(tables, pd.DataFrame):
        tables = [tables]
    df = combine_tables(tables, group_by)
    classes = list(bundle.classes)
    ref = bundle.meta.get(REFERENCE_KEY)
    res_warn: list[str] = []

    # scale
    scale_info: dict = {}
    if bundle.um_per_px:
        um, origin, rec = ScalePolicy(given=um_per_px, estimate=estimate_scale, group_col="group").resolve(df)
        res_warn += rec.warnings
        df["um_per_px"], df["scale_origin"] = um, origin
        scale_info = {g: {"um_per_px_median": s["um_per_px"], "origin": s["origin"], "estimate": rec.estimates.get(g)}
                      for g, s in sorted(rec.sources.items())}
    else:
        df["um_per_px"], df["scale_origin"] = np.nan, "model has no physical scale: resized"
        scale_info = {"note": "the model records no µm/px; every image is resized to the input, as in training"}

    # colour
    target = None
    if stain_normalize:
        target = stain_target or (ref or {}).get("stain")
        if not target:
            raise ValueError("--stain-normalize needs a reference: the bundle stores none; give --fit-reference DATA "
                             "(in-distribution cells) or a target")

    known = df["label"].isin(classes).to_numpy()
    x, ok, errors, col = prepare_images(bundle, list(df["path"].astype(str)), df["um_per_px"].tolist(),
                                        stain_target=target, colour=True, colour_on=colour_basis(ref))
    out = forward(bundle, x, batch_size=batch_size, features=True, tta=tta, precision="fp32", progress=progress)
    f = out.features
    plain = out.probabilities(bundle.temperature, tta=False)
    probs = out.probabilities(bundle.temperature)  # the mean over the 8 views with tta
    finite, bad = nonfinite_errors(probs, df["path"].iloc[ok].astype(str))  # never a call: an error
    if bad:
        errors = list(errors) + bad
        ok = [i for i, g in zip(ok, finite) if g]
        f, plain, probs, col = f[finite], plain[finite], probs[finite], col[finite]
    rows = df.iloc[ok].reset_index(drop=True)
    pred = predictions_table(rows["path"].tolist(), probs, classes, label=rows["label"].to_numpy(),
                             fold=np.zeros(len(rows), dtype=int))
    pred["source"] = rows["group"].to_numpy()
    pred["known"] = rows["label"].isin(classes).to_numpy()
    pred["max_prob"] = probs.max(1) if len(probs) else np.zeros(0)
    cell_ood = score_cells(bundle, f, col) if (ref is not None and len(f)) else None
    pred["ood_score"] = cell_ood.score if cell_ood is not None else np.nan
    pred["ood_flag"] = cell_ood.flag if cell_ood is not None else pd.array([pd.NA] * len(pred), dtype="boolean")
    pred["um_per_px"] = rows["um_per_px"].to_numpy()
    pred["scale_origin"] = rows["scale_origin"].to_numpy()

    per_source, per_class_rows, ood = {}, [], {}
    groups = list(pd.unique(df["group"]))
    for g in groups + ["ALL"]:
        sub_all = pred if g == "ALL" else pred[pred["source"] == g]
        sub = sub_all[sub_all["known"]]
        n_unknown = df.loc[(~known) & ((df["group"] == g) if g != "ALL" else True), "label"].value_counts()
        entry: dict = {"n_images": int(len(sub_all)), "n_scored": int(len(sub)),
                       "n_unknown_class": int(n_unknown.sum()),
                       "unknown_classes": {str(k): int(v) for k, v in n_unknown.items()},
                       "classes_scored": [c for c in classes if c in set(sub["label"])]}
        if len(sub):
            m = overall_metrics(sub, classes=classes, n_boot=n_boot, seed=seed)
            entry.update({k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
            entry["predicted_classes"] = {str(k): int(v) for k, v in sub["pred"].value_counts().items()}
            fm = per_class_fold_metrics(sub, classes)
            for r in fm.itertuples(index=False):
                if r.n_true == 0 and r.n_pred == 0:
                    continue
                per_class_rows.append({"source": g, "class": r._1, "n_true": r.n_true, "n_pred": r.n_pred,
                                       "sensitivity": r.sensitivity, "precision": r.precision, "f1": r.f1})
        per_source[str(g)] = entry
        if g != "ALL":
            mask = (pred["source"] == g).to_numpy()
            ood[str(g)] = ood_check(ref, f[mask] if len(f) else f, plain.max(1)[mask], str(g),
                                    colour=col[mask])
            if cell_ood is not None:  # the per-cell flag of predict and screen, summed up for this source
                ood[str(g)]["cells"] = ood_summary(cell_ood.flag[mask], cell_ood.score[mask], cell_ood.threshold)
            if ood[str(g)].get("warning"):
                res_warn.append(ood[str(g)]["warning"])
    if ref is None:
        res_warn.append("no out-of-distribution check: the bundle stores no in-distribution reference "
                        "(run evaluate once with --fit-reference DATA, cells of the training lab not trained on)")
    per_class = pd.DataFrame(per_class_rows, columns=["source", "class", "n_true", "n_pred", "sensitivity",
                                                      "precision", "f1"])
    settings = {"model": bundle.path, "classes": classes, "group_by": group_by, "um_per_px": um_per_px,
                "estimate_scale": estimate_scale, "model_um_per_px": bundle.um_per_px,
                "stain_normalize": bool(stain_normalize), "n_boot": n_boot, "seed": seed}
    return EvaluationResult(pred, per_source, per_class, ood, scale_info, res_warn, errors, settings)


def write_outputs(result: EvaluationResult, out: str | os.PathLike) -> dict[str, Path]:
    """``evaluate.json``, ``per_class.csv`` and ``predictions.csv`` in folder ``out`` (atomic writes)."""
    out = Path(out)
    return {
        "evaluate.json": atomic_write_json(result.summary(), out / "evaluate.json"),
        "per_class.csv": atomic_write_csv(result.per_class, out / "per_class.csv"),
        "predictions.csv": write_table(result.predictions, out / "predictions.csv"),
    }


def validation_table(bundle, train_table: pd.DataFrame) -> pd.DataFrame:
    """The validation images of a ``leukoscope train`` run, reproduced from its training table.

    The trainer holds out ``val_fraction`` per class with ``seed`` (stratified); given the
    same table this returns the same images, i.e. in-distribution cells the weights were
    not fitted on: the right data for :func:`fit_reference`.
    """
    cfg = bundle.meta.get("config") or {}
    t = train_table[train_table["label"].isin(bundle.classes)].reset_index(drop=True)
    cidx = {c: i for i, c in enumerate(bundle.classes)}
    y = np.array([cidx[c] for c in t["label"]])
    _, va = stratified_val_split(y, float(cfg.get("val_fraction", 0.1)), int(cfg.get("seed", 0)))
    return t.iloc[va].reset_index(drop=True)
