"""The labels a reviewer can give a cell, and the one key that gives each.

The 15 classes of :mod:`leukoscope.taxonomy` plus three review-only outcomes:
``unidentified`` (the screen's referral group: must be resolved before sign-off),
``not_leukocyte`` and ``artefact`` (not counted in the differential, not exported as
training data). Keys follow the taxonomy's groups: the mature cells on 1-6, the
immature ones on 7-9, 0 and q, w, e, the others on r, t; the outcomes on u, n, a.

>>> KEYS["1"], KEYS["u"]
('NGS', 'unidentified')
>>> check_label("MYO")
'MYO'
"""

from __future__ import annotations

from leukoscope import taxonomy
from leukoscope.screen.count import UNIDENTIFIED

NOT_LEUKOCYTE = "not_leukocyte"
ARTEFACT = "artefact"
#: Review-only outcomes, in the order the page lists them.
OUTCOMES: tuple[str, ...] = (UNIDENTIFIED, NOT_LEUKOCYTE, ARTEFACT)
#: Outcomes that are not leukocytes: neither counted nor exported as training data.
NOT_COUNTED: tuple[str, ...] = (NOT_LEUKOCYTE, ARTEFACT)
OUTCOME_NAMES = {UNIDENTIFIED: "Unidentified", NOT_LEUKOCYTE: "Not a leukocyte", ARTEFACT: "Artefact"}

#: Classes in the order of the taxonomy's groups (mature, immature, other): the gallery's order.
CLASS_ORDER: tuple[str, ...] = tuple(c for members in taxonomy.GROUPS.values() for c in members)
#: Every label, in gallery order: unidentified first (to be resolved), then the classes, then the rest.
LABELS: tuple[str, ...] = (UNIDENTIFIED,) + CLASS_ORDER + NOT_COUNTED

_CLASS_KEYS = "1234567890qwertyu"[:len(CLASS_ORDER)]
#: One key per label (key -> label).
KEYS: dict[str, str] = {**dict(zip(_CLASS_KEYS, CLASS_ORDER)), "u": UNIDENTIFIED, "n": NOT_LEUKOCYTE, "a": ARTEFACT}
KEY_OF: dict[str, str] = {label: key for key, label in KEYS.items()}


def label_name(label: str) -> str:
    """Full name of a label (class or outcome)."""
    return taxonomy.CLASS_NAMES.get(label) or OUTCOME_NAMES.get(label) or label


def check_label(label) -> str:
    """``label`` if a reviewer may give it, else a ``ValueError`` listing the valid ones."""
    if not isinstance(label, str) or label not in KEY_OF:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    return label


def _self_check() -> None:
    assert sorted(CLASS_ORDER) == sorted(taxonomy.CLASSES)
    assert len(KEYS) == len(LABELS) == 18 and set(KEYS.values()) == set(LABELS)


_self_check()
