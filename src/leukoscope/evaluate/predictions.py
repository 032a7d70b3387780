"""The one writer of a predictions table (``predict``, ``cv``, ``evaluate``) and its number format.

>>> import numpy as np
>>> predictions_table(["a.png"], np.array([[0.2, 0.8]]), ["LYT", "MYB"], label=["MYB"]).columns.tolist()
['path', 'label', 'pred', 'p_blast', 'p_atypical', 'prob_LYT', 'prob_MYB']
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from leukoscope import taxonomy
from leukoscope.io import atomic_write_csv

#: How every probability table (predictions.csv, cells.csv) writes floats: 6 significant digits.
FLOAT_FORMAT = "%.6g"


def write_table(df: pd.DataFrame, path) -> Path:
    """Write a probability table atomically with :data:`FLOAT_FORMAT`; returns the path."""
    return atomic_write_csv(df, path, float_format=FLOAT_FORMAT)


def predictions_table(paths: Sequence, probs: np.ndarray, classes: Sequence[str], **extra_columns) -> pd.DataFrame:
    """``path[,<extra>...],pred,p_blast,p_atypical,prob_<CLASS>...`` (classes of the model, taxonomy order).

    ``extra_columns`` (e.g. ``label=...``, ``fold=...``): one value per row, placed after ``path`` in
    the order given."""
    classes = list(classes)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(paths), len(classes))
    df = pd.DataFrame({"path": [str(p) for p in paths]})
    for name, values in extra_columns.items():
        df[name] = np.asarray(list(values)) if not np.isscalar(values) else values
    df["pred"] = np.array(classes, dtype=object)[probs.argmax(1)] if len(df) else pd.Series(dtype=object)
    df["p_blast"] = taxonomy.binary_scores(probs, classes, "blast")
    df["p_atypical"] = taxonomy.binary_scores(probs, classes, "atypical")
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, j]
    return df
