"""Every reader on real data and on files the tests make; every bad-input case."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukoscope.cli.main import main
from leukoscope.data import (CellDataset, check_images, detect_layout, read_dataset, read_datasets, register_reader,
                             unregister_reader)
from leukoscope.data.readers import registered_readers


def _png(path, color=(200, 100, 150), size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(path)


# --------------------------------------------------------------------- real data

def test_lmu_sample_summary(lmu_sample):
    ds = check_images(read_dataset(lmu_sample))
    assert ds.layout == "lmu"
    assert len(ds) == 48
    counts = ds.counts()
    assert sum(1 for n in counts.values() if n) == 13
    assert counts["LYA"] == counts["MOB"] == 0 and counts["NGS"] == 5 and counts["MMZ"] == 1
    ann = ds.extra["annotations"]
    assert ann["n_listed"] == 18365 and ann["n_absent"] == 18365 - 48 and ann["n_not_listed"] == 0
    assert ds.skipped == []  # no RGBA trouble
    assert ds.extra["images"]["modes"] == {"RGBA": 48}
    assert ds.table["um_per_px"].eq(29 / 400).all()
    row = ds.table[ds.table["path"].str.endswith("MON_0882.tiff")].iloc[0]
    assert (row["reannotation1"], row["reannotation2"]) == ("MYO", "MON")


def test_pbc_manifest(pbc_root):
    ds = read_dataset(pbc_root)
    assert ds.layout == "manifest"
    assert len(ds) == 4321 and ds.extra["n_unlabelled"] == 371
    c = ds.counts()
    assert c["NGS"] == 460 and c["PMO"] == 501 and c["BAS"] == 420 and c["MYO"] == 0
    assert "mapping" in ds.table.columns  # extra manifest columns are kept


def test_external_manifest(external_root):
    ds = read_dataset(external_root / "labels.csv")
    assert len(ds) == 103 and ds.extra["n_unlabelled"] == 12
    assert ds.counts()["BAS"] == 15


def test_cli_summary_json(lmu_sample, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["data", "summary", str(lmu_sample), "--json", str(out)]) == 0
    js = json.loads(out.read_text())
    assert js["n_images"] == 48 and js["classes"]["BAS"] == 5 and js["skipped"] == []
    printed = capsys.readouterr().out
    assert "Basophil" in printed and "18317 are absent" in printed
    assert printed.count("\n") < 60  # absent files are a count, not 18,317 lines


# --------------------------------------------------------------------- made here

def test_folders_with_label_map_and_problems(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        _png(root / "neutrophil" / f"n{i}.png")
        _png(root / "lymphocyte" / f"l{i}.jpg")
    (root / "empty_class").mkdir()
    (root / "neutrophil" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _png(root / "platelet" / "p.png")
    lm = tmp_path / "map.csv"
    lm.write_text("folder,label\nneutrophil,NGS\nlymphocyte,LYT\nplatelet,\nempty_class,MON\n")
    ds = read_dataset(root, label_map=lm)
    assert ds.layout == "folders"
    assert ds.counts()["NGS"] == 4 and ds.counts()["LYT"] == 3
    assert any("empty_class" in n and "empty" in n for n in ds.notes)
    assert any("platelet" in s["reason"] for s in ds.skipped)
    check_images(ds)
    assert ds.counts()["NGS"] == 3  # the broken file moved to skipped, the rest kept
    bad = [s for s in ds.skipped if s["path"].endswith("broken.png")]
    assert bad and "truncated or corrupt" in bad[0]["reason"]


def test_folder_with_unknown_label_is_clear(tmp_path):
    _png(tmp_path / "ds" / "granulocyte" / "a.png")
    with pytest.raises(ValueError, match="unknown label 'granulocyte'"):
        read_dataset(tmp_path / "ds")


def test_manifest_relative_absolute_empty_unknown(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    abs_c = tmp_path / "elsewhere" / "c.png"
    _png(abs_c)
    m = tmp_path / "m.csv"
    m.write_text(f"path,label,patient\nimg/a.png,MYO,p1\nimg/b.png,,p1\n{abs_c},NGS,p2\nimg/missing.png,NGS,p3\n")
    ds = read_dataset(m)
    assert sorted(ds.table["label"]) == ["MYO", "NGS"]
    assert set(ds.table["patient"]) == {"p1", "p2"}
    assert ds.extra["n_unlabelled"] == 1
    assert any("file not found" in s["reason"] for s in ds.skipped)
    m.write_text("path,label\nimg/a.png,BLAST\n")
    with pytest.raises(ValueError, match=r"unknown label\(s\) 'BLAST' \(line 2\)"):
        read_dataset(m)
    assert len(read_dataset(m, label_map={"BLAST": "MYO"})) == 1
    m.write_text("file,class\nimg/a.png,MYO\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_dataset(m)


def test_lmu_layout_mismatches(tmp_path):
    root = tmp_path / "lmu"
    _png(root / "MYO" / "MYO_0001.png")
    _png(root / "MYO" / "MYO_0002.png")  # not annotated
    (root / "annotations.dat").write_text(
        "MYO/MYO_0001.png MYO nan nan\nMYO/MYO_0003.png MYO UNC MYO\nNGS/NGS_0001.png NGS nan nan\n")
    ds = read_dataset(root)
    assert len(ds) == 1
    assert ds.extra["annotations"]["n_absent"] == 2
    assert [s["reason"] for s in ds.skipped] == ["image not listed in annotations.dat"]


def test_missing_and_bad_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_dataset(tmp_path, annotations=tmp_path / "annotations.dat")
    bad = tmp_path / "annotations.dat"
    bad.write_text("A/A_1.tiff XYZ nan nan\n")
    with pytest.raises(ValueError, match="unknown gold labels"):
        read_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        detect_layout(tmp_path / "nowhere")


def test_cli_error_is_one_clean_line(tmp_path, capsys):
    assert main(["data", "summary", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


# --------------------------------------------------------------------- registry, several datasets


def test_a_registered_reader_is_what_read_dataset_uses(tmp_path):
    """A new format is one function and one registration; the built-in layouts and their errors stay."""
    root = tmp_path / "toy"
    _png(root / "MYO" / "a.png")  # class folders too: the toy layout (priority 50) comes before the catch-all
    _png(root / "b.png")
    (root / "toy.txt").write_text("MYO/a.png myelo\nb.png lympho\n")
    calls = []

    def read_toy(path, label_map=None):
        calls.append(label_map)
        rows = [line.split() for line in (path / "toy.txt").read_text().splitlines()]
        table = pd.DataFrame({"path": [str((path / r).resolve()) for r, _ in rows],
                              "label": [label_map[lab] for _, lab in rows], "patient": pd.NA, "source": pd.NA,
                              "um_per_px": np.nan})
        return CellDataset(table, "toy", path.resolve())

    assert detect_layout(root) == "folders"
    register_reader("toy", detect=lambda p: (p / "toy.txt").exists())(read_toy)
    try:
        with pytest.raises(ValueError, match="'toy' is registered already"):
            register_reader("toy", detect=lambda p: False)(read_toy)
        assert detect_layout(root) == "toy"
        assert [r.name for r in registered_readers()] == ["lmu", "manifest", "toy", "folders"]
        ds = read_dataset(root, label_map={"myelo": "MYO", "lympho": "LYT"})
        assert ds.layout == "toy" and sorted(ds.table["label"]) == ["LYT", "MYO"]
        assert calls == [{"myelo": "MYO", "lympho": "LYT"}]
        (tmp_path / "nothing").mkdir()
        with pytest.raises(ValueError, match="no class folders; registered layouts: toy"):
            read_dataset(tmp_path / "nothing")
    finally:
        unregister_reader("toy")
    assert detect_layout(root) == "folders"
    with pytest.raises(ValueError, match=r"no class folders\)$"):
        read_dataset(tmp_path / "nothing")
    with pytest.raises(KeyError, match="no dataset reader named 'toy'"):
        unregister_reader("toy")


def test_read_datasets_one_table_a_source_each_and_no_image_twice(cells_root, tmp_path):
    lab_a = tmp_path / "lab_a"
    for i in range(2):
        _png(lab_a / "neutrophil" / f"n{i}.png")
    _png(tmp_path / "lab_b" / "img" / "x.png")
    _png(tmp_path / "lab_b" / "img" / "y.png")
    (tmp_path / "lab_b" / "labels.csv").write_text("path,label,source\nimg/x.png,MYO,hospital\nimg/y.png,NGS,\n")
    ds = read_datasets([cells_root, lab_a, tmp_path / "lab_b"], label_maps=[None, {"neutrophil": "NGS"}, None])
    assert ds.layout == "multi" and len(ds) == 24 + 2 + 2 and ds.table["path"].is_unique
    by_source = ds.table.groupby("source")["label"].apply(sorted).to_dict()
    assert by_source == {"lmu": sorted(read_dataset(cells_root).table["label"]), "lab_a": ["NGS", "NGS"],
                         "hospital": ["MYO"], "lab_b": ["NGS"]}  # its own source where it has one, else the folder
    assert ds.table["reannotation1"].notna().sum() == 24  # a dataset's own columns are kept
    assert [d["layout"] for d in ds.extra["datasets"]] == ["lmu", "folders", "manifest"]
    assert ds.root == Path(os.path.commonpath([cells_root.resolve(), tmp_path.resolve()]))
    # the same image twice is refused, naming it
    (tmp_path / "again.csv").write_text(f"path,label\n{lab_a / 'neutrophil' / 'n0.png'},NGS\n")
    with pytest.raises(ValueError, match="n0.png: the same image is in two datasets"):
        read_datasets([lab_a, tmp_path / "again.csv"], label_maps=[{"neutrophil": "NGS"}, None])
    with pytest.raises(ValueError, match="1 label maps for 2 datasets"):
        read_datasets([lab_a, tmp_path / "lab_b"], label_maps=[None])
    with pytest.raises(ValueError, match="no dataset given"):
        read_datasets([])
