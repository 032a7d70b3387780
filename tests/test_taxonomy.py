import numpy as np
import pytest

from leukoscope import taxonomy as tx


def test_fifteen_classes_and_eighteen_leaves():
    assert len(tx.CLASSES) == 15
    assert list(tx.CLASSES) == sorted(tx.CLASSES)  # taxonomy order is the dataset's alphabetical order
    assert len(tx.LEAVES) == 18
    branches = {b: sum(1 for l in tx.LEAVES if l.branch == b) for b in ("physiological", "pathological", "smudge")}
    assert branches == {"physiological": 6, "pathological": 11, "smudge": 1}


def test_merges_follow_the_paper():
    assert {l.key for l in tx.leaves_of("MYO")} == {"myeloblast", "myeloblast_auer"}
    assert {l.key for l in tx.leaves_of("PMO")} == {"promyelocyte", "promyelocyte_auer", "faggot_cell"}
    assert tx.merge_leaf("promyelocyte_bilobed") == "PMB"
    with pytest.raises(KeyError, match="unknown leaf"):
        tx.merge_leaf("platelet")


def test_binary_groups_and_scores():
    assert set(tx.BLAST) == {"MYO", "MOB"}
    assert set(tx.ATYPICAL) == {"MYO", "MOB", "MYB", "MMZ", "PMO", "PMB", "EBO", "LYA"}
    classes = ("LYT", "MOB", "MYO", "NGS")
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.0, 0.1, 0.2]])
    np.testing.assert_allclose(tx.binary_scores(probs, classes, "blast"), [0.5, 0.1])
    # classes the model lacks contribute nothing
    np.testing.assert_allclose(tx.binary_scores(probs, ("LYT", "NGS", "EOS", "BAS"), "blast"), [0, 0])
    assert tx.binary_truth(["MYO", "NGS", "EBO"], "atypical").tolist() == [True, False, True]


def test_unknown_class_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown class label 'XYZ'"):
        tx.class_index("XYZ")
    assert tx.group_of("EBO") == "other" and tx.group_of("NGS") == "mature"
