"""Differential counts, blast percentage and their confidence intervals.

A differential count is a binomial proportion per class; its uncertainty matters (a
100-cell differential has ±10 % on a 50 % class). Intervals are Wilson score
intervals (good coverage at small n, never outside [0, 1]) or exact Clopper-Pearson.

The blast percentage is over the *identified* leukocytes: cells whose calibrated
confidence was below the referral threshold are listed as ``unidentified`` for human
review and enter neither numerator nor denominator; ``blast_pct_if_unidentified_blasts``
says how high the percentage could go if every one of them were a blast.

>>> lo, hi = wilson_interval(10, 100)
>>> round(lo, 3), round(hi, 3)
(0.055, 0.174)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import beta, norm

from leukoscope import taxonomy

#: WHO threshold for AML: blasts >= 20 % of leukocytes (in blood or marrow).
WHO_AML_BLAST_FRACTION = 0.20
#: A 200-cell differential is the usual minimum for a blood smear.
MIN_CELLS_FOR_DIFFERENTIAL = 200
#: The group name for cells referred to review.
UNIDENTIFIED = "unidentified"


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n``; (nan, nan) when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)

    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def clopper_pearson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of ``k / n``; (nan, nan) when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)

    a = 1 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return (lo, hi)


def interval(k: int, n: int, method: str = "wilson", level: float = 0.95) -> tuple[float, float]:
    if method == "wilson":
        return wilson_interval(k, n, level)
    if method in ("clopper-pearson", "exact"):
        return clopper_pearson_interval(k, n, level)
    raise ValueError(f"unknown interval method {method!r}; use 'wilson' or 'clopper-pearson'")


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def count_summary(preds: Sequence[str], p_blast: Sequence[float] | None = None, classes: Sequence[str] = taxonomy.CLASSES,
                  method: str = "wilson", level: float = 0.95) -> dict:
    """Differential count of predicted labels (``UNIDENTIFIED`` for referred cells).

    Returns cells found, identified and unidentified, per class ``{n, fraction, ci}``,
    the blast count and percentage (MYO + MOB) with CI, the expected blast count
    (sum of P(blast) over identified cells) and the flags.
    """
    preds = [str(p) for p in preds]
    n_all = len(preds)
    n_unid = sum(p == UNIDENTIFIED for p in preds)
    ident = [p for p in preds if p != UNIDENTIFIED]
    n = len(ident)
    counts = {c: 0 for c in classes}
    for p in ident:
        counts[p] = counts.get(p, 0) + 1
    diff = {}
    for c, k in counts.items():
        lo, hi = interval(k, n, method, level)
        diff[c] = {"n": k, "fraction": _num(k / n) if n else None, "ci": [_num(lo), _num(hi)]}
    n_blast = sum(counts.get(c, 0) for c in taxonomy.BLAST)
    n_atyp = sum(counts.get(c, 0) for c in taxonomy.ATYPICAL)
    blo, bhi = interval(n_blast, n, method, level)
    frac = n_blast / n if n else math.nan
    worst = (n_blast + n_unid) / n_all if n_all else math.nan
    expected = None
    if p_blast is not None:
        pb = np.asarray(p_blast, dtype=np.float64)
        mask = np.array([p != UNIDENTIFIED for p in preds], dtype=bool)
        expected = _num(float(pb[mask].sum())) if len(pb) == n_all else None
    flags = {
        "blasts_present": n_blast > 0,
        "blasts_ge_20pct": bool(n and frac >= WHO_AML_BLAST_FRACTION),
        "blasts_ge_20pct_possible": bool(n_all and ((n and bhi >= WHO_AML_BLAST_FRACTION) or worst >= WHO_AML_BLAST_FRACTION)),
        "too_few_cells": n < MIN_CELLS_FOR_DIFFERENTIAL,
        "has_unidentified": n_unid > 0,
        "no_leukocytes": n_all == 0,
    }
    return {
        "cells_found": n_all,
        "identified": n,
        "unidentified": n_unid,
        "interval": f"{method} {level:.0%}",
        "differential": diff,
        "blasts": {"n": n_blast, "fraction": _num(frac), "ci": [_num(blo), _num(bhi)],
                   "expected_n_from_probabilities": expected},
        "blast_pct": _num(100 * frac) if n else None,
        "blast_pct_ci": [_num(100 * blo) if n else None, _num(100 * bhi) if n else None],
        "blast_pct_if_unidentified_blasts": _num(100 * worst) if n_all else None,
        "atypical": {"n": n_atyp, "fraction": _num(n_atyp / n) if n else None},
        "flags": flags,
        "flag_text": flag_text(flags),
    }


def flag_text(flags: dict) -> list[str]:
    """Human-readable flags, most important first."""
    out = []
    if flags.get("no_leukocytes"):
        out.append("no leukocytes found")
    if flags.get("blasts_ge_20pct"):
        out.append("blasts >= 20% of leukocytes (WHO AML threshold)")
    elif flags.get("blasts_ge_20pct_possible"):
        out.append("blasts >= 20% cannot be excluded (confidence interval or unidentified cells reach 20%)")
    if flags.get("blasts_present"):
        out.append("blasts present")
    if flags.get("has_unidentified"):
        out.append("cells referred for review (unidentified)")
    if flags.get("too_few_cells") and not flags.get("no_leukocytes"):
        out.append(f"fewer than {MIN_CELLS_FOR_DIFFERENTIAL} identified cells: counts are imprecise")
    return out
