"""The hostile-input sweep of issue 17: build each input in a temporary folder, run the command line on
it in a child process, and write ``docs/robustness-inputs.md`` (one row per input: the command, its exit
code, whether a traceback was shown, and the first line of its message).

    python benchmarks/hostile_inputs.py                     # every case, writes docs/robustness-inputs.md
    python benchmarks/hostile_inputs.py --only 7 9 11       # the cases of these issue items, print only
    python benchmarks/hostile_inputs.py --out FILE

Everything is generated (synthetic cells and smears, an untrained 32 px model, a fake cross-validation
run); each case runs in a process forked from this one (so torch is imported once); the training cases use the fast preset at 32 px for one or two epochs, so the whole sweep takes a
few minutes on a CPU. Nothing is read from or written outside the temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import struct
import sys
import tempfile
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.update(LEUKOSCOPE_NO_TCMALLOC="1", LEUKOSCOPE_PROGRESS="none")  # before leukoscope is imported
os.environ.pop("LEUKOSCOPE_DEBUG", None)

from leukoscope.evaluate.predictions import predictions_table, write_table  # noqa: E402
from leukoscope.synth import write_cells, write_smear  # noqa: E402

CLASSES = ("LYT", "MOB", "MYO", "NGS")
TINY_TRAIN = ["--preset", "fast", "--model", "plain_cnn", "--input-size", "32", "--epochs", "1", "--per-class", "4",
              "--batch-size", "8", "--workers", "1"]
TIMEOUT_S = 240
SMEAR_UM = 0.25  # the synthetic smear's scale: small cells, a small field


class Ctx:
    """The shared generated inputs, each built on first use under ``root``."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @cached_property
    def cells(self) -> Path:
        return write_cells(self.root / "cells", per_class=6, size=48, classes=CLASSES, progress=False)

    @cached_property
    def image(self) -> Path:
        return sorted((self.cells / "LYT").iterdir())[0]

    @cached_property
    def png(self) -> Path:
        from PIL import Image

        p = self.path("one.png")
        Image.open(self.image).convert("RGB").save(p)
        return p

    @cached_property
    def model(self) -> Path:
        import torch

        from leukoscope.models.bundle import make_meta, save_bundle
        from leukoscope.models.registry import create_model, get_config

        torch.manual_seed(0)
        cfg = get_config("plain_cnn", input_size=32)
        model = create_model("plain_cnn", num_classes=len(CLASSES), input_size=32)
        meta = make_meta(classes=CLASSES, model="plain_cnn", input_size=32, mean=cfg.mean, std=cfg.std,
                         um_per_px=cfg.um_per_px, temperature=1.0)
        return save_bundle(model, meta, self.path("model/model.safetensors"))

    @cached_property
    def nan_model(self) -> Path:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(self.model), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for k, t in tensors.items():
            if t.is_floating_point():
                t.fill_(float("nan"))
        p = self.path("nan_model/model.safetensors")
        save_file(tensors, str(p), metadata=meta)
        return p

    @cached_property
    def smear(self) -> Path:
        image, _ = write_smear(self.path("smear/field.tif"), 400, 400, n_leukocytes=2, seed=1, um_per_px=SMEAR_UM,
                               classes=CLASSES)
        return image

    @cached_property
    def cvrun(self) -> Path:
        """A cross-validation run folder as 'leukoscope cv' leaves it (2 folds, 12 predictions)."""
        run = self.path("cvrun/x").parent
        n = 12
        rng = np.random.default_rng(0)
        labels = [CLASSES[i % len(CLASSES)] for i in range(n)]
        paths = [f"{c}/{c}_{i:04d}.tiff" for i, c in enumerate(labels)]
        df = predictions_table(paths, rng.dirichlet(np.ones(len(CLASSES)), n), CLASSES, label=labels,
                               fold=[i % 2 for i in range(n)])
        df = df[["path", "label", "fold", "pred"] + [f"prob_{c}" for c in CLASSES]]
        write_table(df, run / "predictions.csv")
        df[["path", "label", "fold"]].to_csv(run / "split.csv", index=False)
        (run / "cv_summary.json").write_text(json.dumps({"n": n}))
        for k in (0, 1):
            (run / f"fold{k}").mkdir(exist_ok=True)
            (run / f"fold{k}" / "model.safetensors").write_bytes(self.model.read_bytes())
        return run

    def manifest(self, name: str, rows: list[tuple[str, str]], *, encoding="utf-8", newline="\n",
                 extra_header: str = "", extra: list[str] | None = None) -> Path:
        """A CSV manifest ``path,label[,<extra>]`` of cells images (absolute paths)."""
        head = "path,label" + extra_header
        lines = [head] + [f"{p},{lab}" + (("," + extra[i]) if extra else "") for i, (p, lab) in enumerate(rows)]
        p = self.path(name)
        p.write_bytes((newline.join(lines) + newline).encode(encoding))
        return p

    def rows(self, n: int = 4) -> list[tuple[str, str]]:
        return [(str(p), p.parent.name) for c in CLASSES for p in sorted((self.cells / c).iterdir())[:n]]


@dataclass
class Case:
    item: str           # issue 17 item ("1" .. "12") or "own"
    what: str           # the hostile input, in words
    build: Callable[[Ctx, Path], list[str]]   # -> argv of 'leukoscope' (or ["-c", code] with api=True)
    api: bool = False   # argv is ``python -c CODE``
    fsize: int | None = None   # RLIMIT_FSIZE in bytes (a full disk: writes fail with EFBIG)
    mine: bool = False  # fixed on branch wt-hardcli17 (tests/test_hostile_inputs.py checks: no traceback)


@dataclass
class Row:
    n: int
    case: Case
    command: str
    rc: int
    traceback: str
    message: str
    seconds: float = 0.0
    output: str = field(default="", repr=False)


def _d(tmp: Path, name: str) -> Path:
    p = tmp / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def _write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD claims ``width`` x ``height`` RGB pixels (no pixel data)."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, width * height * 3)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def _tiff16(ctx: Ctx, tmp: Path, bits: int) -> Path:
    import tifffile
    from PIL import Image

    rgb = np.asarray(Image.open(ctx.image).convert("RGB"), dtype=np.uint16)
    p = tmp / f"cell_{bits}bit.tif"
    tifffile.imwrite(p, (rgb * ((1 << bits) - 1) // 255).astype(np.uint16), photometric="rgb")
    return p


def _float_tiff_dataset(ctx: Ctx, tmp: Path) -> Path:
    import tifffile
    from PIL import Image

    root = _d(tmp, "floatds")
    for c in CLASSES[:2]:
        for i, src in enumerate(sorted((ctx.cells / c).iterdir())[:2]):
            rgb = np.asarray(Image.open(src).convert("RGB"), dtype=np.float32) / 255
            _d(root, c)
            tifffile.imwrite(root / c / f"{c}_{i}.tif", rgb, photometric="rgb")
    return root


def _dup_annotations(ctx: Ctx, tmp: Path) -> Path:
    root = _d(tmp, "dup")
    for c in CLASSES:
        _d(root, c)
        for p in sorted((ctx.cells / c).iterdir())[:6]:
            (root / c / p.name).write_bytes(p.read_bytes())
    lines = [f"{c}/{p.name} {c} nan nan" for c in CLASSES for p in sorted((root / c).iterdir())]
    first = lines[0].split()[0]
    lines.append(f"{first} MYO nan nan")  # the same image again, under another label
    _write(root / "annotations.dat", "\n".join(lines) + "\n")
    return root


def _labels_csv(ctx: Ctx, tmp: Path, um: str) -> Path:
    root = _d(tmp, "withlabels")
    rows = ctx.rows(3)
    _write(root / "labels.csv", "path,label,um_per_px\n" + "".join(f"{p},{lab},{um}\n" for p, lab in rows))
    return root


def _one_class(ctx: Ctx, tmp: Path) -> Path:
    root = _d(tmp, "oneclass")
    _d(root, "LYT")
    for p in sorted((ctx.cells / "LYT").iterdir()):
        (root / "LYT" / p.name).write_bytes(p.read_bytes())
    return root


def _finished_run(ctx: Ctx, tmp: Path) -> Path:
    out = tmp / "finished"
    rc, _, err = _run_forked(["train", str(ctx.cells), *TINY_TRAIN, "--out", str(out)], api=False, fsize=None,
                             cwd=tmp)
    if rc != 0:
        raise RuntimeError(f"the run to re-run did not train: {err.strip().splitlines()[-1:]}")
    return out


def _fake_checkpoint(tmp: Path, data: bytes) -> Path:
    out = _d(tmp, "ckrun")
    _write(out / "checkpoint.pt", data)
    return out


def _pickle_bytes() -> bytes:
    import pickle

    return pickle.dumps({"epoch": 1, "state": [1, 2, 3]})


def _truncated(path: Path, tmp: Path, name: str) -> Path:
    data = path.read_bytes()
    return _write(tmp / name, data[: len(data) // 2])


def _symlink_loop(tmp: Path) -> Path:
    root = _d(tmp, "loopy")
    _d(root, "LYT")
    os.symlink(root, root / "LYT" / "again")
    os.symlink(root / "b", root / "a")
    os.symlink(root / "a", root / "b")
    return root


def _cut_predictions(ctx: Ctx, tmp: Path) -> Path:
    run = _d(tmp, "cutrun")
    for f in ("split.csv", "cv_summary.json"):
        (run / f).write_bytes((ctx.cvrun / f).read_bytes())
    lines = (ctx.cvrun / "predictions.csv").read_text().splitlines(keepends=True)
    (run / "predictions.csv").write_text("".join(lines[: len(lines) // 2]))
    return run


def _stale_tmp(ctx: Ctx, tmp: Path) -> Path:
    out = _d(tmp, "stale")
    _write(out / ".preds.csv.abc123.tmp", "half a file")
    return out / "preds.csv"


def _images_with(tmp: Path, name: str, data: bytes) -> Path:
    return _write(tmp / name, data)


def _unreadable_dir(ctx: Ctx, tmp: Path) -> Path:
    root = _d(tmp, "locked")
    _d(root, "LYT")
    (root / "LYT" / "a.png").write_bytes(ctx.png.read_bytes())
    (root / "LYT").chmod(0)
    return root


def _gray_and_alpha(ctx: Ctx, tmp: Path) -> Path:
    from PIL import Image

    root = _d(tmp, "modes")
    im = Image.open(ctx.png)
    im.convert("L").save(root / "gray.png")
    im.convert("RGBA").save(root / "alpha.png")
    im.convert("P").save(root / "palette.png")
    return root


def _cases() -> list[Case]:
    M = lambda c: str(c.model)  # noqa: E731
    rand = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    C: list[Case] = [
        # 1: non-finite numbers
        Case("1", "model whose weights are all NaN: predict", lambda c, t: [
            "predict", str(c.nan_model), str(c.image), "--out", str(t / "p.csv")]),
        Case("1", "model whose weights are all NaN: screen", lambda c, t: [
            "screen", str(c.nan_model), str(c.smear), "--out", str(t / "s"), "--um-per-px", str(SMEAR_UM)]),
        Case("1", "training with --lr 1e12 (loss becomes NaN)", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--lr", "1e12", "--out", str(t / "r")]),
        # 2: duplicate annotations
        Case("2", "annotations.dat lists one image twice under two labels: data summary", lambda c, t: [
            "data", "summary", str(_dup_annotations(c, t))]),
        Case("2", "annotations.dat lists one image twice under two labels: split", lambda c, t: [
            "split", str(_dup_annotations(c, t)), "--folds", "2", "--out", str(t / "s.csv")]),
        Case("2", "annotations.dat lists one image twice under two labels: agreement", lambda c, t: [
            "agreement", str(_dup_annotations(c, t) / "annotations.dat")]),
        # 3: run folder
        Case("3", "finished run re-run on other data (one class fewer)", lambda c, t: [
            "train", str(_dup_annotations(c, t)), *TINY_TRAIN, "--out", str(_finished_run(c, t))]),
        Case("3", "finished run re-run on a one-class dataset", lambda c, t: [
            "train", str(_one_class(c, t)), *TINY_TRAIN, "--out", str(_finished_run(c, t))]),
        # 4: physical scale
        *[Case("4", f"predict --um-per-px {v}", (lambda v: lambda c, t: [
            "predict", M(c), str(c.image), "--out", str(t / "p.csv"), f"--um-per-px={v}"])(v))
          for v in ("0", "-1", "nan", "inf", "1e-9")],
        Case("4", "labels.csv with um_per_px -1: data summary", lambda c, t: [
            "data", "summary", str(_labels_csv(c, t, "-1"))]),
        Case("4", "labels.csv with um_per_px 'abc': data summary", lambda c, t: [
            "data", "summary", str(_labels_csv(c, t, "abc"))]),
        Case("4", "screen --um-per-px 0", lambda c, t: [
            "screen", M(c), str(c.smear), "--out", str(t / "s"), "--um-per-px", "0"]),
        Case("4", "evaluate --um-per-px -1", lambda c, t: [
            "evaluate", M(c), str(c.cells), "--um-per-px=-1", "--bootstrap", "0"]),
        Case("4", "API: predict_paths(bundle, imgs, um_per_px=-1)", lambda c, t: [
            "-c", f"from leukoscope.models import load_bundle; from leukoscope.predict import predict_paths; "
                  f"print(len(predict_paths(load_bundle({str(c.model)!r}), [{str(c.image)!r}], um_per_px=-1).table))"],
             api=True),
        # 5
        Case("5", "API: predict_paths(bundle, 'file.png') (a string, not a list)", lambda c, t: [
            "-c", f"from leukoscope.models import load_bundle; from leukoscope.predict import predict_paths; "
                  f"print(len(predict_paths(load_bundle({str(c.model)!r}), {str(c.png)!r}).table))"], api=True),
        # 6
        Case("6", "12-bit data in a 16-bit TIFF: predict", lambda c, t: [
            "predict", M(c), str(_tiff16(c, t, 12)), "--out", str(t / "p.csv")]),
        Case("6", "float32 TIFF dataset: data summary", lambda c, t: [
            "data", "summary", str(_float_tiff_dataset(c, t))]),
        # 7: messages, not tracebacks
        Case("7", "--out in a folder nobody may write (/proc)", lambda c, t: [
            "predict", M(c), str(c.image), "--out", "/proc/leukoscope-preds.csv"], mine=True),
        Case("7", "predict --out that is an existing folder", lambda c, t: [
            "predict", M(c), str(c.image), "--out", str(_d(t, "adir"))], mine=True),
        Case("7", "predict --out under a file (a/file.txt/p.csv)", lambda c, t: [
            "predict", M(c), str(c.image), "--out", str(_write(t / "f.txt", "x") / "p.csv")], mine=True),
        Case("7", "screen --out that is a file", lambda c, t: [
            "screen", M(c), str(c.smear), "--out", str(_write(t / "f.txt", "x"))], mine=True),
        Case("7", "evaluate --out that is a file", lambda c, t: [
            "evaluate", M(c), str(c.cells), "--out", str(_write(t / "f.txt", "x"))], mine=True),
        Case("7", "train --out that is a file", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--out", str(_write(t / "f.txt", "x"))], mine=True),
        Case("7", "disk full while writing predictions (file size limit 2 kB: EFBIG)", lambda c, t: [
            "predict", M(c), str(c.cells), "--out", str(t / "p.csv")], fsize=2048, mine=True),
        Case("7", "disk full while writing a split (file size limit 200 B: EFBIG)", lambda c, t: [
            "split", str(c.cells), "--folds", "2", "--out", str(t / "s.csv")], fsize=200, mine=True),
        Case("7", "train --batch-size 0", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--batch-size", "0", "--out", str(t / "r")], mine=True),
        Case("7", "predict --batch-size 0", lambda c, t: [
            "predict", M(c), str(c.image), "--out", str(t / "p.csv"), "--batch-size", "0"], mine=True),
        Case("7", "predict --batch-size -1", lambda c, t: [
            "predict", M(c), str(c.image), "--out", str(t / "p.csv"), "--batch-size=-1"], mine=True),
        Case("7", "--label-map JSON that is a list, not an object", lambda c, t: [
            "data", "summary", str(c.cells), "--label-map", str(_write(t / "m.json", '[["a", "NGS"]]'))],
             mine=True),
        Case("7", "--label-map that is not JSON at all", lambda c, t: [
            "data", "summary", str(c.cells), "--label-map", str(_write(t / "m.json", "{oops"))], mine=True),
        Case("7", "agreement on a folder (not its annotations.dat)", lambda c, t: [
            "agreement", str(c.cells)], mine=True),
        Case("7", "export --opset 1", lambda c, t: [
            "export", M(c), "--onnx", str(t / "m.onnx"), "--opset", "1"], mine=True),
        Case("7", "export --onnx that is a folder", lambda c, t: [
            "export", M(c), "--onnx", str(_d(t, "adir"))], mine=True),
        Case("7", "checkpoint.pt that is a pickle", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--out", str(_fake_checkpoint(t, _pickle_bytes()))]),
        Case("7", "truncated checkpoint.pt", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--out", str(_fake_checkpoint(t, b"PK\x03\x04" + rand[:100]))]),
        # 8: limits and ranges
        Case("8", "train --epochs 0", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--epochs", "0", "--out", str(t / "r")]),
        Case("8", "train --input-size 1", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--input-size", "1", "--out", str(t / "r")]),
        Case("8", "train --val-fraction 2.5", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--val-fraction", "2.5", "--out", str(t / "r")]),
        Case("8", "train on a single class", lambda c, t: [
            "train", str(_one_class(c, t)), *TINY_TRAIN, "--out", str(t / "r")]),
        Case("8", "report --bootstrap -5", lambda c, t: [
            "report", str(c.cvrun), "--bootstrap=-5", "--out", str(t / "rep")], mine=True),
        Case("8", "evaluate --bootstrap -5", lambda c, t: [
            "evaluate", M(c), str(c.cells), "--bootstrap=-5"], mine=True),
        Case("8", "screen a TIFF whose header claims 30,000 x 30,000 px (900 MP)", lambda c, t: [
            "screen", M(c), str(_images_with(t, "huge.tif", _tiff_header(30_000, 30_000))), "--out",
            str(t / "s"), "--um-per-px", str(SMEAR_UM)]),
        # 9: partial results
        Case("9", "report on predictions.csv cut at a line boundary", lambda c, t: [
            "report", str(_cut_predictions(c, t)), "--bootstrap", "0", "--saliency-per-class", "0"], mine=True),
        Case("9", "predict on an empty folder", lambda c, t: [
            "predict", M(c), str(_d(t, "empty")), "--out", str(t / "p.csv")], mine=True),
        Case("9", "predict, one unreadable file of two", lambda c, t: [
            "predict", M(c), str(c.image), str(_write(t / "bad.png", b"not a png")), "--out", str(t / "p.csv")],
             mine=True),
        Case("9", "predict --strict, one unreadable file of two", lambda c, t: [
            "predict", M(c), str(c.image), str(_write(t / "bad.png", b"not a png")), "--out", str(t / "p.csv"),
            "--strict"], mine=True),
        Case("9", "screen, one unreadable smear of two", lambda c, t: [
            "screen", M(c), str(c.smear), str(_write(t / "bad.tif", b"II*\x00garbage")), "--out", str(t / "s"),
            "--um-per-px", str(SMEAR_UM)], mine=True),
        Case("9", "data summary --strict with an unreadable image", lambda c, t: [
            "data", "summary", str(c.manifest("m_bad.csv", c.rows(2) + [(str(_write(t / "LYT" / "x.png", b"junk")),
                                                                         "LYT")])), "--strict"], mine=True),
        # 10
        Case("10", "stale .NAME.*.tmp beside --out from a killed run", lambda c, t: [
            "predict", M(c), str(c.image), "--out", str(_stale_tmp(c, t))]),
        # 11: consistency
        Case("11", "train with the old --quiet (screen's spelling)", lambda c, t: [
            "train", str(c.cells), *TINY_TRAIN, "--quiet", "--out", str(t / "r")], mine=True),
        Case("11", "screen with the old --no-progress (train's spelling)", lambda c, t: [
            "screen", M(c), str(c.smear), "--no-progress", "--out", str(t / "s"), "--um-per-px", str(SMEAR_UM)],
             mine=True),
        Case("11", "data summary --progress plain", lambda c, t: [
            "data", "summary", str(c.cells), "--progress", "plain"], mine=True),
        Case("11", "evaluate --device cpu --progress plain", lambda c, t: [
            "evaluate", M(c), str(c.cells), "--device", "cpu", "--progress", "plain", "--bootstrap", "0"],
             mine=True),
        Case("11", "report --device cpu", lambda c, t: [
            "report", str(c.cvrun), "--device", "cpu", "--bootstrap", "0", "--out", str(t / "rep")], mine=True),
        Case("11", "screen --device cpu", lambda c, t: [
            "screen", M(c), str(c.smear), "--device", "cpu", "--out", str(t / "s"), "--um-per-px", str(SMEAR_UM)],
             mine=True),
        Case("11", "an unknown option on a subcommand", lambda c, t: [
            "predict", M(c), str(c.image), "--out", str(t / "p.csv"), "--colour"], mine=True),
        Case("11", "predict given a cv run folder", lambda c, t: [
            "predict", str(c.cvrun), str(c.image), "--out", str(t / "p.csv")], mine=True),
        # 12: fuzzing-like inputs
        Case("12", "random bytes named .png: predict", lambda c, t: [
            "predict", M(c), str(_images_with(t, "r.png", rand)), "--out", str(t / "p.csv")], mine=True),
        Case("12", "PNG cut in half: predict", lambda c, t: [
            "predict", M(c), str(_truncated(c.png, t, "half.png")), "--out", str(t / "p.csv")], mine=True),
        Case("12", "random bytes as model.safetensors", lambda c, t: [
            "predict", str(_images_with(t, "model.safetensors", rand)), str(c.image), "--out", str(t / "p.csv")],
             mine=True),
        Case("12", "random bytes as annotations.dat: agreement", lambda c, t: [
            "agreement", str(_images_with(t, "annotations.dat", rand))]),
        Case("12", "model bundle cut in half", lambda c, t: [
            "predict", str(_truncated(c.model, t, "half.safetensors")), str(c.image), "--out", str(t / "p.csv")],
             mine=True),
        # our own
        Case("own", "zero-byte TIFF: predict", lambda c, t: [
            "predict", M(c), str(_write(t / "zero.tif", b"")), "--out", str(t / "p.csv")], mine=True),
        Case("own", "zero-byte CSV manifest: data summary", lambda c, t: [
            "data", "summary", str(_write(t / "empty.csv", b""))], mine=True),
        Case("own", "1x1 px image: predict", lambda c, t: [
            "predict", M(c), str(_one_px(t)), "--out", str(t / "p.csv")], mine=True),
        Case("own", "TIFF header claiming 30,000 x 30,000 px: predict", lambda c, t: [
            "predict", M(c), str(_images_with(t, "huge.tif", _tiff_header(30_000, 30_000))), "--out",
            str(t / "p.csv")], mine=True),
        Case("own", "manifest in Latin-1 (not UTF-8) with an accented path", lambda c, t: [
            "data", "summary", str(c.manifest("latin1.csv", c.rows(2) + [(str(t / "café.png"), "LYT")],
                                              encoding="latin-1"))], mine=True),
        Case("own", "manifest with a UTF-8 byte-order mark", lambda c, t: [
            "data", "summary", str(_write(t / "bom.csv", b"\xef\xbb\xbf" + c.manifest("b0.csv", c.rows(2))
                                          .read_bytes()))], mine=True),
        Case("own", "manifest with Windows line endings", lambda c, t: [
            "data", "summary", str(c.manifest("crlf.csv", c.rows(2), newline="\r\n"))], mine=True),
        Case("own", "manifest with an unknown label", lambda c, t: [
            "data", "summary", str(c.manifest("unk.csv", c.rows(2) + [(str(c.image), "XYZ")]))], mine=True),
        Case("own", "manifest without a label column", lambda c, t: [
            "data", "summary", str(_write(t / "nolabel.csv", "path\n" + str(c.image) + "\n"))], mine=True),
        Case("own", "symbolic-link loop in a dataset folder: data summary", lambda c, t: [
            "data", "summary", str(_symlink_loop(t))], mine=True),
        Case("own", "symbolic-link loop given to predict", lambda c, t: [
            "predict", M(c), str(_symlink_loop(t) / "a"), "--out", str(t / "p.csv")], mine=True),
        Case("own", "class folder with mode 000 (root still reads it)", lambda c, t: [
            "data", "summary", str(_unreadable_dir(c, t))], mine=True),
        Case("own", "grey, RGBA and palette PNGs: predict", lambda c, t: [
            "predict", M(c), str(_gray_and_alpha(c, t)), "--out", str(t / "p.csv")], mine=True),
        Case("own", "file name with spaces and non-ASCII letters: predict", lambda c, t: [
            "predict", M(c), str(_write(t / "a cell é.png", c.png.read_bytes())), "--out", str(t / "p.csv")],
             mine=True),
        Case("own", "a folder of non-images only: predict", lambda c, t: [
            "predict", M(c), str(_write(t / "docs" / "readme.txt", "hello").parent), "--out", str(t / "p.csv")],
             mine=True),
        Case("own", "model path that does not exist", lambda c, t: [
            "predict", str(t / "nope.safetensors"), str(c.image), "--out", str(t / "p.csv")], mine=True),
        Case("own", "a text file as the model", lambda c, t: [
            "predict", str(_write(t / "m.safetensors", "hello")), str(c.image), "--out", str(t / "p.csv")],
             mine=True),
        Case("own", "a run folder without a model as the model", lambda c, t: [
            "evaluate", str(_d(t, "norun")), str(c.cells), "--bootstrap", "0"], mine=True),
        Case("own", "data summary on a path that does not exist", lambda c, t: [
            "data", "summary", str(t / "nowhere")], mine=True),
        Case("own", "data summary on an empty folder", lambda c, t: [
            "data", "summary", str(_d(t, "empty"))], mine=True),
        Case("own", "split --folds 0", lambda c, t: [
            "split", str(c.cells), "--folds", "0", "--out", str(t / "s.csv")], mine=True),
        Case("own", "split with more folds than images per class", lambda c, t: [
            "split", str(c.cells), "--folds", "9", "--out", str(t / "s.csv")], mine=True),
        Case("own", "cv --folds 1", lambda c, t: [
            "cv", str(c.cells), *TINY_TRAIN, "--folds", "1", "--out", str(t / "cv")], mine=True),
        Case("own", "synth cells --per-class 0", lambda c, t: [
            "synth", "cells", "--per-class", "0", "--out", str(t / "s")], mine=True),
        Case("own", "report on a folder that is not a run", lambda c, t: [
            "report", str(_d(t, "notrun")), "--bootstrap", "0"], mine=True),
        Case("own", "agreement on an empty annotations.dat", lambda c, t: [
            "agreement", str(_write(t / "annotations.dat", b""))], mine=True),
        Case("own", "review export of a database that does not exist", lambda c, t: [
            "review", "export", str(t / "none.sqlite"), "--out", str(t / "exp")], mine=True),
        Case("own", "evaluate --split without --fold", lambda c, t: [
            "evaluate", M(c), str(c.cells), "--split", str(c.cvrun / "split.csv")], mine=True),
        Case("own", "screen --refer-below 7 (a probability above 1)", lambda c, t: [
            "screen", M(c), str(c.smear), "--refer-below", "7", "--out", str(t / "s"), "--um-per-px", str(SMEAR_UM)]),
        Case("own", "a subcommand that does not exist", lambda c, t: ["predcit", "x"], mine=True),
    ]
    return C


def _one_px(tmp: Path) -> Path:
    from PIL import Image

    p = tmp / "one_px.png"
    Image.new("RGB", (1, 1), (200, 100, 150)).save(p)
    return p


def _run_forked(argv: list[str], *, api: bool, fsize: int | None, cwd: Path) -> tuple[int, str, str]:
    """Run ``leukoscope ARGV`` (or ``python -c`` code) in a forked child of this already-imported process.

    A fresh interpreter per case costs a torch import each (tens of seconds on a loaded machine); the
    child is a separate process all the same: its own exit code, output, working folder and limits.
    An exception that escapes the command is printed as Python would print it (a traceback)."""
    from leukoscope.cli.main import main as cli_main

    out_f, err_f = cwd / ".stdout", cwd / ".stderr"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.chdir(cwd)
            fo, fe = os.open(out_f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), os.open(err_f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # not a caller's capture
            sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            try:
                if api:
                    exec(compile(argv[1], "<api>", "exec"), {"__name__": "__main__"})
                    code = 0
                else:
                    code = int(cli_main(list(argv)) or 0)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    t0 = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - t0 > TIMEOUT_S:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 124, "", f"timed out after {TIMEOUT_S} s"
        time.sleep(0.05)
    rc = os.waitstatus_to_exitcode(status)
    read = lambda f: f.read_text(errors="replace") if f.exists() else ""  # noqa: E731
    return rc, read(out_f), read(err_f)


def _message(out: str, err: str, rc: int) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in err:
        tail = [ln for ln in lines if not ln.startswith(("File ", "^", "~"))]
        return tail[-1] if tail else "?"
    picks = [ln for ln in lines if ("error" in ln.lower() or "usage" in ln.lower() or "failed" in ln.lower())
             and not ln.startswith("usage:")]
    if rc != 0 and picks:
        return picks[0]
    if rc != 0 and lines:
        return lines[-1]
    failed = [ln for ln in lines if "inputs failed" in ln]
    if failed:
        return failed[0]
    outl = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return outl[-1] if outl else (lines[-1] if lines else "")


def run_case(n: int, case: Case, ctx: Ctx, tmp_root: Path) -> Row:
    tmp = _d(tmp_root, f"case{n:03d}")
    t0 = time.time()
    try:
        argv = case.build(ctx, tmp)
    except Exception as exc:  # the input could not be built: say so in the table
        return Row(n, case, "(not built)", -1, "n/a", f"input not built: {type(exc).__name__}: {exc}")
    rc, out, err = _run_forked(argv, api=case.api, fsize=case.fsize, cwd=tmp)
    tb = "yes" if "Traceback (most recent call last)" in err else ("internal" if "internal error" in err else "no")
    if case.api and tb == "yes":  # a library call raising is its way to refuse: say which exception
        tb = "raised"
    shown = " ".join(("python -c '...'" if case.api and a.startswith("from ") else a) for a in argv)
    shown = shown.replace(str(tmp_root), "$T").replace(str(ctx.root), "$T")
    prefix = "python" if case.api else "leukoscope"
    if case.fsize:
        prefix = f"(ulimit -f {case.fsize // 512}) " + prefix
    msg = _message(out, err, rc).replace(str(tmp_root), "$T").replace(str(ctx.root), "$T")
    return Row(n, case, f"{prefix} {shown}", rc, tb, msg, time.time() - t0, out + err)


def run_sweep(cases: list[Case], root: Path) -> list[Row]:
    """Run ``cases`` one after the other (each in a forked process); the shared inputs are built first."""
    import torch

    torch.set_num_threads(1)  # no OpenMP worker threads in the parent: each case forks from it
    ctx = Ctx(_d(root, "shared"))
    _ = ctx.cells, ctx.model, ctx.smear, ctx.cvrun, ctx.png, ctx.nan_model
    return [run_case(n, case, ctx, _d(root, "cases")) for n, case in enumerate(cases, 1)]


def _cell(s: str, limit: int = 160) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def write_markdown(rows: list[Row], path: Path, seconds: float) -> None:
    n_tb = sum(r.traceback == "yes" for r in rows)
    n_internal = sum(r.traceback == "internal" for r in rows)
    n_raised = sum(r.traceback == "raised" for r in rows)
    try:
        where = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h (%D)"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        where = "unknown"
    lines = [
        "# Hostile inputs: what each command does with them",
        "",
        "Written by `python benchmarks/hostile_inputs.py` (issue 17): every input is generated in a temporary",
        "folder ($T below) and the command is run in a child process. Exit codes follow docs/CONTRACTS.md",
        "(\"Exit codes\"): 0 done (also when some inputs failed: a line says how many), 1 failed or `--strict`",
        "with a failed input, 2 usage or input error, 4 file-system error, 70 internal error (a bug; the",
        "traceback with `--debug`). *item*: the item of issue 17 the input belongs to (own: added here).",
        "*traceback*: yes when a Python traceback was printed (for a library call, `python -c`: *raised* when",
        "it raised an exception, its way to refuse; the message is the exception's line).",
        "",
        f"{len(rows)} inputs: {n_tb} with a traceback, {n_internal} internal error(s) (one line; `--debug` shows "
        f"the traceback), {n_raised} library call(s) that raised; sweep time {seconds:.0f} s, at commit {where}.",
        "",
        "| # | item | input | command | exit | traceback | first line of the message |",
        "|---:|---|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.n} | {r.case.item} | {_cell(r.case.what, 90)} | `{_cell(r.command, 150)}` | {r.rc} | "
                     f"{r.traceback} | {_cell(r.message)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ITEM", help="only the cases of these items (1..12, own, mine)")
    ap.add_argument("--out", default=str(REPO / "docs" / "robustness-inputs.md"),
                    help="the Markdown table to write (default docs/robustness-inputs.md; not with --only)")
    args = ap.parse_args(argv)
    cases = _cases()
    if args.only:
        cases = [c for c in cases if c.item in args.only or ("mine" in args.only and c.mine)]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="leukoscope-hostile-") as tmp:
        rows = run_sweep(cases, Path(tmp))
        for p in Path(tmp).rglob("*"):  # give back the mode-000 folders so that the cleanup can remove them
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o700)
    for r in rows:
        print(f"{r.n:>3} [{r.case.item:>3}] rc={r.rc:<3} tb={r.traceback:<8} {r.seconds:5.1f}s  {r.case.what}: "
              f"{r.message[:110]}")
    if not args.only:
        write_markdown(rows, Path(args.out), time.time() - t0)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
