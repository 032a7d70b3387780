"""Many scans in one screen: a folder per scan, the run index, resuming an interrupted batch."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from leukoscope.screen import tiles as tiles_mod
from leukoscope.screen.batch import INDEX_COLUMNS, read_index, scan_folders, screen_batch
from leukoscope.screen.engine import ScreenEngine
from leukoscope.synth import write_smear

from test_screen import ScriptedBundle


@pytest.fixture()
def three_scans(tmp_path):
    d = tmp_path / "scans"
    d.mkdir()
    return [write_smear(d / f"scan{i}.tif", 900, 700, n_leukocytes=4, seed=30 + i, um_per_px=0.1)[0]
            for i in range(3)]


class CountingEngine(ScreenEngine):
    """Counts the cells classified per scan; raises KeyboardInterrupt at the first tile of ``stop_at``."""

    def __init__(self, *args, stop_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at
        self.detected: list[str] = []

    def detect_tile(self, smear, tile, um, cal, region=None, **kwargs):
        name = smear.path.rsplit("/", 1)[-1]
        if name == self.stop_at and any(n == name for n in self.detected):
            raise KeyboardInterrupt  # the user stops the run during the scan's second tile
        self.detected.append(name)
        return super().detect_tile(smear, tile, um, cal, region=region, **kwargs)


def test_interrupted_batch_resumes_at_the_scan_and_tile_where_it_stopped(three_scans, tmp_path, monkeypatch):
    monkeypatch.setattr(tiles_mod, "WHOLE_READ_PIXELS", 1000)  # tiled reads: several tiles per scan
    out = tmp_path / "out"
    # batch 1: every tile is checkpointed at once; one detection thread: no tile after the interrupted one starts
    kw = dict(tile_size=256, progress=False, batch_size=1, workers=1)
    first = CountingEngine(ScriptedBundle(), stop_at="scan1.tif", **kw)
    with pytest.raises(KeyboardInterrupt):
        screen_batch(first, three_scans, out, review=False)
    index = read_index(out)
    assert index.status.tolist() == ["ok", "pending", "pending"]
    assert (out / "scan0" / "cells.csv").is_file() and not (out / "scan1" / "cells.csv").exists()
    n_tiles1 = sum(1 for n in first.detected if n == "scan1.tif")
    assert n_tiles1 == 1

    bundle = ScriptedBundle()
    again = CountingEngine(bundle, **kw)
    index = screen_batch(again, three_scans, out, review=False)
    assert "scan0.tif" not in again.detected  # scan 1 of 3 is not redone ...
    assert again.detected.count("scan1.tif") == index.tiles[1] - 1  # ... scan 2 resumes after its first tile
    assert index.status.tolist() == ["resumed", "resumed", "ok"]
    assert index.tiles_resumed[1] == 1 and index.tiles[1] > 2
    assert list(index.columns) == INDEX_COLUMNS
    # the index is complete and agrees with each scan's own results
    on_disk = pd.read_csv(out / "index.csv")
    assert on_disk.scan.tolist() == [str(p) for p in three_scans]
    for _, row in on_disk.iterrows():
        cells = pd.read_csv(out / row.folder / "cells.csv")
        summary = json.loads((out / row.folder / "summary.json").read_text())
        assert row.cells == len(cells) == summary["overall"]["cells_found"] == 4
        assert row.blast_pct == summary["overall"]["blast_pct"]
    # every cell of the resumed scan once, as a fresh screen finds them
    fresh = ScreenEngine(ScriptedBundle(), tile_size=256, progress=False).screen([three_scans[1]])
    resumed = pd.read_csv(out / "scan1" / "cells.csv")
    key = ["x0", "y0", "x1", "y1"]
    pd.testing.assert_frame_equal(resumed[key].sort_values(key).reset_index(drop=True),
                                  fresh.cells[key].sort_values(key).reset_index(drop=True).astype(resumed[key].dtypes))
    # a third run redoes nothing
    third = CountingEngine(ScriptedBundle(), **kw)
    assert screen_batch(third, three_scans, out, review=False).status.tolist() == ["resumed"] * 3
    assert third.detected == []


def test_a_failing_scan_never_loses_the_others(three_scans, tmp_path):
    bad = tmp_path / "scans" / "broken.tif"
    bad.write_bytes(b"II*\x00 not a tiff")
    out = tmp_path / "out"
    index = screen_batch(ScreenEngine(ScriptedBundle(), progress=False), [three_scans[0], bad, three_scans[2]], out)
    assert index.status.tolist() == ["ok", "failed", "ok"]
    assert "broken.tif" in index.error[1] and index.cells[0] == 4 and index.cells[2] == 4
    assert (out / "scan0" / "review.html").is_file() and (out / "scan2" / "summary.json").is_file()
    # the failed scan is tried again next time, the others are not redone
    again = screen_batch(ScreenEngine(ScriptedBundle(), progress=False), [three_scans[0], bad, three_scans[2]], out)
    assert again.status.tolist() == ["resumed", "failed", "resumed"]


def test_scan_folder_names_are_unique_and_safe():
    assert scan_folders(["a/x.tif", "b/x.tif", "c/X.tiff", "d/a b?.png", "e/index.tif"]) == [
        "x", "x-2", "X-3", "a_b", "index-2"]


def test_cli_screen_per_scan_writes_a_folder_per_scan_and_the_index(three_scans, tmp_path, monkeypatch, capsys):
    from leukoscope.cli import screen as screen_cli
    from leukoscope.cli.main import main

    monkeypatch.setattr(screen_cli, "load_bundle", lambda path, **kw: ScriptedBundle())
    out = tmp_path / "out"
    rc = main(["screen", "model.safetensors", str(three_scans[0].parent), "--out", str(out), "--per-scan", "--quiet",
               "--no-review"])
    assert rc == 0
    index = pd.read_csv(out / "index.csv")
    assert index.folder.tolist() == ["scan0", "scan1", "scan2"] and (index.status == "ok").all()
    assert (index.cells == 4).all()
    assert not (out / "cells.csv").exists() and all((out / f / "cells.csv").is_file() for f in index.folder)
    printed = capsys.readouterr().out
    assert "3 of 3 scans screened" in printed and "index.csv" in printed and "leukoscope review" in printed
    assert main(["screen", "model.safetensors", str(three_scans[0].parent), "--out", str(out), "--per-scan",
                 "--quiet"]) == 0
    assert "resumed, 4 cells" in capsys.readouterr().out
