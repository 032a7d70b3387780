"""Durable atomic writes (fsync of the file before the rename and of the folder after it) and the
clean-up of stale temporary files left by a killed process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from leukoscope import io
from leukoscope.io import atomic_write_csv, atomic_write_text, remove_stale_temp_files


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync call as (is a folder, does the target exist yet)."""
    calls = []
    real = os.fsync

    def spy(fd):
        calls.append(os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None)
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", spy)
    return calls


def test_atomic_write_fsyncs_the_file_then_the_folder(tmp_path, fsyncs):
    target = tmp_path / "out.txt"
    atomic_write_text("hello", target)
    assert target.read_text() == "hello"
    assert len(fsyncs) == 2
    if fsyncs[0] is not None:
        assert fsyncs == [False, True]  # the temporary file first, then the folder holding the rename


def test_the_file_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "p.csv"
    seen = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: (seen.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (seen.append("replace"), real_replace(a, b))[1])
    atomic_write_csv(pd.DataFrame({"a": [1, 2]}), target)
    assert seen == ["fsync", "replace", "fsync"]
    assert pd.read_csv(target)["a"].tolist() == [1, 2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_are_removed_on_the_next_write_into_the_folder(tmp_path):
    old = time.time() - 2 * io.STALE_AFTER_S
    dead = _dead_pid()
    stale_dead = tmp_path / f".model.safetensors.{dead}.abcd1234.tmp"      # writer gone, 2 h old
    stale_old = tmp_path / ".predictions.csv.x1y2z3w4.tmp"                 # old form, 2 h old
    fresh_dead = tmp_path / f".log.csv.{dead}.qwer5678.tmp"                # writer gone but only just written
    alive = tmp_path / f".config.json.{os.getpid()}.zxcv0987.tmp"         # a live writer's (this process)
    other = tmp_path / ".notes.tmp"                                        # not our pattern
    for p in (stale_dead, stale_old, fresh_dead, alive, other):
        p.write_text("partial")
    for p in (stale_dead, stale_old, other):
        os.utime(p, (old, old))
    recent = time.time() - 2 * io.DEAD_PID_GRACE_S
    os.utime(alive, (recent, recent))
    dead_recent = tmp_path / f".b.csv.{dead}.asdf1234.tmp"
    dead_recent.write_text("partial")
    os.utime(dead_recent, (recent, recent))

    atomic_write_text("x", tmp_path / "new.txt")
    left = {p.name for p in tmp_path.iterdir()}
    assert stale_dead.name not in left and stale_old.name not in left and dead_recent.name not in left
    assert {fresh_dead.name, alive.name, other.name, "new.txt"} <= left
    # the rule by itself: nothing more to remove now
    assert remove_stale_temp_files(tmp_path) == []


def test_temp_names_carry_the_writers_pid(tmp_path, monkeypatch):
    names = []
    real = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: (names.append(os.path.basename(a)), real(a, b))[1])
    atomic_write_text("x", tmp_path / "f.txt")
    assert names and names[0].startswith(f".f.txt.{os.getpid()}.") and names[0].endswith(".tmp")


def test_screen_checkpoint_recovery_rewrite_is_atomic(tmp_path, monkeypatch):
    """Dropping the line an interruption cut goes through a rename, never an in-place rewrite."""
    import json

    from leukoscope.screen.engine import _Checkpoint

    header = {"format": 1, "image": "x.tif"}
    tile = {"tile": 0, "columns": ["a"], "cells": [[1.0]]}
    ck = tmp_path / "x.jsonl"
    ck.write_text(json.dumps(header) + "\n" + json.dumps(tile) + "\n" + '{"tile": 1, "colu', encoding="utf-8")
    renamed = []
    real = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: (renamed.append(str(b)), real(a, b))[1])
    done, _ = _Checkpoint._read(ck, header)
    assert list(done) == [0]
    assert renamed == [str(ck)]
    assert ck.read_text(encoding="utf-8").splitlines() == [json.dumps(header), json.dumps(tile)]


def test_bulk_outputs_that_can_be_made_again_skip_the_fsyncs(tmp_path, fsyncs):
    from leukoscope.io import atomic_path

    with atomic_path(tmp_path / "cell.tiff", durable=False) as tmp:
        tmp.write_bytes(b"x")
    assert fsyncs == [] and (tmp_path / "cell.tiff").read_bytes() == b"x"
