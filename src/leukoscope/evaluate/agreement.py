"""Human agreement: the second examiner's re-annotations against the gold labels.

AML-Cytomorphology_LMU's ``annotations.dat`` carries two re-annotation columns for
a subset of images (``nan`` = not re-annotated, ``UNC`` = could not assign a
class). For each column this module reports, over the images that examiner
re-annotated:

* ``n``: images re-annotated; ``n_unc``: of them, marked ``UNC``;
* ``kappa``: Cohen's kappa with the gold labels over the ``n - n_unc`` assignable images;
* ``kappa_unc_as_error``: kappa over all ``n`` images, ``UNC`` counted as a disagreement;
* ``confusion``: gold label x re-annotation counts (``UNC`` as its own column);
* ``blast`` / ``atypical``: the examiner's sensitivity and specificity for the two
  clinical questions, over the assignable images (these are the points the paper
  draws on its ROC curves).

All statistics come from scikit-learn.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from leukoscope import taxonomy
from leukoscope.data.readers import read_annotations

EXAMINERS = ("reannotation1", "reannotation2")


def binary_sens_spec(gold, called, question: str) -> dict:
    """Sensitivity and specificity of hard calls for a binary question (NaN when undefined)."""
    truth = taxonomy.binary_truth(gold, question)
    pred = taxonomy.binary_truth(called, question)
    if len(truth) == 0:
        tn = fp = fn = tp = 0
    else:
        cm = confusion_matrix(truth, pred, labels=[False, True])
        tn, fp, fn, tp = (int(x) for x in cm.ravel())
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "n_pos": tp + fn,
        "n_neg": tn + fp,
    }


def agreement(annotations: pd.DataFrame) -> dict:
    """Agreement of each re-annotation column with the gold labels.

    ``annotations`` has columns ``gold``, ``reannotation1``, ``reannotation2`` (as
    returned by :func:`leukoscope.data.read_annotations`, which lists each image once). A table
    whose ``path`` column lists an image twice is refused (``ValueError`` naming it): every image
    counts once.
    """
    if "path" in annotations and annotations["path"].duplicated().any():
        dup = annotations.loc[annotations["path"].duplicated(), "path"]
        raise ValueError(f"{len(dup)} image(s) listed more than once, e.g. {dup.iloc[0]}: agreement counts each "
                         "image once (read the file with read_annotations, which refuses or collapses duplicates)")
    out = {}
    for col in EXAMINERS:
        if col not in annotations:
            continue
        sub = annotations[annotations[col] != taxonomy.NOT_ANNOTATED]
        n = int(len(sub))
        assignable = sub[sub[col] != taxonomy.UNCERTAIN]
        n_unc = n - int(len(assignable))
        res: dict = {"n": n, "n_unc": n_unc, "n_assignable": int(len(assignable))}
        if len(assignable) >= 2 and len(set(assignable["gold"]) | set(assignable[col])) > 1:
            res["kappa"] = float(cohen_kappa_score(assignable["gold"], assignable[col]))
            res["accuracy"] = float((assignable["gold"] == assignable[col]).mean())
        else:
            res["kappa"] = float("nan")
            res["accuracy"] = float("nan")
        if n >= 2:
            res["kappa_unc_as_error"] = float(cohen_kappa_score(sub["gold"], sub[col]))
        else:
            res["kappa_unc_as_error"] = float("nan")
        cols = [c for c in taxonomy.CLASSES if c in set(sub[col])] + (
            [taxonomy.UNCERTAIN] if n_unc else [])
        rows = [c for c in taxonomy.CLASSES if c in set(sub["gold"])]
        labels = sorted(set(rows) | set(cols), key=lambda c: (c == taxonomy.UNCERTAIN, c))
        cm = confusion_matrix(sub["gold"], sub[col], labels=labels) if n else np.zeros((0, 0), int)
        res["confusion"] = {
            "labels": labels,
            "matrix": cm.tolist(),
        }
        for q in taxonomy.BINARY_QUESTIONS:
            res[q] = binary_sens_spec(assignable["gold"], assignable[col], q)
        out[col] = res
    return out


def agreement_from_annotations(path: str | os.PathLike) -> dict:
    """:func:`agreement` on an ``annotations.dat`` file."""
    return agreement(read_annotations(path))


def examiner_points(result: dict, question: str) -> list[dict]:
    """ROC-plane points ``(fpr = 1 - specificity, tpr = sensitivity)`` of each examiner."""
    pts = []
    for col, res in result.items():
        s = res[question]
        pts.append({"examiner": col, "fpr": 1 - s["specificity"], "tpr": s["sensitivity"],
                    "kappa": res["kappa"]})
    return pts


def confusion_frame(result: dict, examiner: str) -> pd.DataFrame:
    """The confusion table of one examiner as a labelled DataFrame (rows gold, columns call)."""
    conf = result[examiner]["confusion"]
    labels = conf["labels"]
    return pd.DataFrame(conf["matrix"], index=pd.Index(labels, name="gold"), columns=pd.Index(labels, name=examiner))
