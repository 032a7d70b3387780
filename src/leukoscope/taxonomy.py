"""The one source of truth for LeukoScope's cell taxonomy.

The annotation scheme of Matek et al. (2019, Fig. 2b) has 18 leaves in a tree
(physiological branch, pathological branch, smudge cells apart). For training the
leaves are merged into the 15 classes of AML-Cytomorphology_LMU: all myeloblasts
become ``MYO``; promyelocytes (with or without Auer rods) and faggot cells become
``PMO``. Two clinical binary questions are asked of the 15-way output by summing
class probabilities: *blast* (MYO + MOB) and *atypical* (MYO MOB MYB MMZ PMO PMB EBO
LYA).

Every other module asks here: nothing else spells out class lists.

>>> CLASSES[:3]
('BAS', 'EBO', 'EOS')
>>> merge_leaf("faggot_cell")
'PMO'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

#: The 15 training classes, in taxonomy order (the order of every ``prob_`` column).
CLASSES: tuple[str, ...] = (
    "BAS", "EBO", "EOS", "KSC", "LYA", "LYT", "MMZ", "MOB",
    "MON", "MYB", "MYO", "NGB", "NGS", "PMB", "PMO",
)

#: Full names, as in the dataset's ``abbreviations.txt``.
CLASS_NAMES: dict[str, str] = {
    "BAS": "Basophil",
    "EBO": "Erythroblast",
    "EOS": "Eosinophil",
    "KSC": "Smudge cell",
    "LYA": "Lymphocyte (atypical)",
    "LYT": "Lymphocyte (typical)",
    "MMZ": "Metamyelocyte",
    "MOB": "Monoblast",
    "MON": "Monocyte",
    "MYB": "Myelocyte",
    "MYO": "Myeloblast",
    "NGB": "Neutrophil (band)",
    "NGS": "Neutrophil (segmented)",
    "PMB": "Promyelocyte (bilobed)",
    "PMO": "Promyelocyte",
}

#: Labels in ``annotations.dat`` that are not classes.
UNCERTAIN = "UNC"   # the examiner could not assign a class
NOT_ANNOTATED = "nan"  # the image was not re-annotated

#: Clinical binary questions (Matek et al. 2019, Fig. 3b,c).
BLAST: tuple[str, ...] = ("MYO", "MOB")
ATYPICAL: tuple[str, ...] = ("MYO", "MOB", "MYB", "MMZ", "PMO", "PMB", "EBO", "LYA")
BINARY_QUESTIONS: dict[str, tuple[str, ...]] = {"blast": BLAST, "atypical": ATYPICAL}

#: Grouping of Table 1 in the paper's report layout.
GROUPS: dict[str, tuple[str, ...]] = {
    "mature": ("NGS", "NGB", "LYT", "MON", "EOS", "BAS"),
    "immature": ("MYO", "MOB", "PMO", "PMB", "MYB", "MMZ", "LYA"),
    "other": ("EBO", "KSC"),
}


@dataclass(frozen=True)
class Leaf:
    """One leaf of the 18-leaf annotation tree."""

    key: str
    name: str
    branch: str  # "physiological", "pathological" or "smudge"
    cls: str     # the training class it is merged into


#: The 18 leaves of the annotation scheme (Fig. 2b), each with its training class.
LEAVES: tuple[Leaf, ...] = (
    # physiological branch
    Leaf("neutrophil_segmented", "Neutrophil (segmented)", "physiological", "NGS"),
    Leaf("neutrophil_band", "Neutrophil (band)", "physiological", "NGB"),
    Leaf("lymphocyte_typical", "Lymphocyte (typical)", "physiological", "LYT"),
    Leaf("monocyte", "Monocyte", "physiological", "MON"),
    Leaf("eosinophil", "Eosinophil", "physiological", "EOS"),
    Leaf("basophil", "Basophil", "physiological", "BAS"),
    # pathological branch
    Leaf("myeloblast", "Myeloblast without Auer rods", "pathological", "MYO"),
    Leaf("myeloblast_auer", "Myeloblast with Auer rods", "pathological", "MYO"),
    Leaf("promyelocyte", "Promyelocyte without Auer rods", "pathological", "PMO"),
    Leaf("promyelocyte_auer", "Promyelocyte with Auer rods", "pathological", "PMO"),
    Leaf("faggot_cell", "Faggot cell", "pathological", "PMO"),
    Leaf("promyelocyte_bilobed", "Promyelocyte (bilobed)", "pathological", "PMB"),
    Leaf("myelocyte", "Myelocyte", "pathological", "MYB"),
    Leaf("metamyelocyte", "Metamyelocyte", "pathological", "MMZ"),
    Leaf("monoblast", "Monoblast", "pathological", "MOB"),
    Leaf("erythroblast", "Erythroblast", "pathological", "EBO"),
    Leaf("lymphocyte_atypical", "Lymphocyte (atypical)", "pathological", "LYA"),
    # apart
    Leaf("smudge_cell", "Smudge cell", "smudge", "KSC"),
)

_LEAF_BY_KEY = {leaf.key: leaf for leaf in LEAVES}
_INDEX = {c: i for i, c in enumerate(CLASSES)}


def merge_leaf(key: str) -> str:
    """Training class of a leaf of the annotation tree (e.g. ``faggot_cell`` -> ``PMO``)."""
    try:
        return _LEAF_BY_KEY[key].cls
    except KeyError:
        raise KeyError(f"unknown leaf {key!r}; known leaves: {', '.join(_LEAF_BY_KEY)}") from None


def leaves_of(cls: str) -> tuple[Leaf, ...]:
    """Leaves merged into training class ``cls``."""
    check_class(cls)
    return tuple(leaf for leaf in LEAVES if leaf.cls == cls)


def is_class(label: str) -> bool:
    return label in _INDEX


def check_class(label: str) -> str:
    """Return ``label`` if it is one of the 15 classes, else raise a clear ``ValueError``."""
    if label not in _INDEX:
        raise ValueError(f"unknown class label {label!r}; expected one of {', '.join(CLASSES)}")
    return label


def class_index(label: str) -> int:
    """Position of ``label`` in :data:`CLASSES`."""
    return _INDEX[check_class(label)]


def group_of(cls: str) -> str:
    """Table-1 group (mature / immature / other) of a class."""
    for group, members in GROUPS.items():
        if cls in members:
            return group
    raise ValueError(f"unknown class label {cls!r}")


def binary_truth(labels: Iterable[str], question: str) -> np.ndarray:
    """Boolean array: does each gold label belong to the positive group of ``question``?"""
    members = set(BINARY_QUESTIONS[question])
    return np.array([lab in members for lab in labels], dtype=bool)


def binary_scores(probs: np.ndarray, classes: Sequence[str], question: str) -> np.ndarray:
    """Score for a binary question: the summed probabilities of its positive classes.

    ``probs`` is ``(n, len(classes))``; classes the model does not know contribute 0.
    """
    probs = np.asarray(probs, dtype=np.float64)
    cols = [i for i, c in enumerate(classes) if c in BINARY_QUESTIONS[question]]
    if not cols:
        return np.zeros(probs.shape[0])
    return probs[:, cols].sum(axis=1)


def _self_check() -> None:
    assert len(CLASSES) == 15 and len(set(CLASSES)) == 15
    assert set(CLASS_NAMES) == set(CLASSES)
    assert len(LEAVES) == 18
    assert {leaf.cls for leaf in LEAVES} == set(CLASSES)
    assert sorted(c for g in GROUPS.values() for c in g) == sorted(CLASSES)
    assert set(BLAST) <= set(ATYPICAL) <= set(CLASSES)


_self_check()
