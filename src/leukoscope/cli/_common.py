"""Option helpers shared by command modules (TIAToolbox-style): one definition per option."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from leukoscope.imaging.scale_policy import check_um_per_px
from leukoscope import progress as _progress
from leukoscope.io import _json_default, atomic_write_json
from leukoscope.train.config import FLAT, GROUPS, TrainConfig, setting_field

#: Titles of the option groups of ``train``/``cv``, one per config group.
_GROUP_TITLES = {"arch": "model", "optim": "schedule (epochs, batches, learning rate, early stopping)",
                 "augment": "augmentation (training only)", "scaling": "scale and colour of the input",
                 "runtime": "runtime (free to change when resuming)",
                 "finetune": "fine-tuning (starting from a trained model; all off by default)"}


#: Exit codes (docs/CONTRACTS.md, "Exit codes"). Partial success (some inputs failed, the others' results
#: written) exits 0 with the line "N of M inputs failed; see FILE" on stderr; ``--strict`` makes it a failure.
EXIT_OK = 0
#: The command failed: nothing usable was written, or ``--strict`` and an input failed.
EXIT_FAILED = 1
#: A usage or input error: a one-line message naming the file or option, no traceback.
EXIT_USAGE = 2
#: The file system refused: permission denied, disk full, a file where a folder was expected, ...
EXIT_IO = 4
#: An unexpected internal error (a bug): one line, the traceback with ``--debug``.
EXIT_INTERNAL = 70


def _int_at_least(v: str, low: int) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of {low} or more, got {v!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be {low} or more, got {n}")
    return n


def positive_int(v: str) -> int:
    """argparse type: an integer of 1 or more."""
    return _int_at_least(v, 1)


def nonneg_int(v: str) -> int:
    """argparse type: an integer of 0 or more."""
    return _int_at_least(v, 0)


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--progress {auto,bar,plain,none}`` and its deprecated aliases ``--no-progress`` / ``--quiet``."""
    p.add_argument("--progress", choices=_progress.MODES, default=None,
                   help="progress display: auto (default: a bar on a terminal, plain lines every 10%% or 30 s "
                        "otherwise), bar, plain or none")
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_const", const="none",
                   help="deprecated: same as --progress none")


def progress_on(args: argparse.Namespace) -> bool:
    """Apply ``--progress`` process-wide (:func:`leukoscope.progress.set_mode`); whether to show any."""
    mode = getattr(args, "progress", None) or "auto"
    _progress.set_mode(mode)
    return mode != "none"


def add_device(p: argparse.ArgumentParser, default: str | None = "cpu") -> None:
    """``--device`` of a command that runs a model."""
    p.add_argument("--device", default=default, metavar="DEVICE",
                   help=f"where the model runs: cpu, cuda, cuda:1 (default: {default or 'auto'})")


def add_strict(p: argparse.ArgumentParser) -> None:
    """``--strict``: any failed input fails the command (exit 1) instead of a partial result (exit 0)."""
    p.add_argument("--strict", action="store_true",
                   help=f"any input that fails fails the command (exit {EXIT_FAILED}, nothing claimed); without it "
                        "the other inputs' results are written, a line says how many failed, and the exit code is 0")


def partial_exit(args: argparse.Namespace, n_failed: int, n_total: int, errors_file: str | os.PathLike | None) -> int:
    """The exit code of the partial-success policy, printing its summary line on stderr when inputs failed."""
    if not n_failed:
        return EXIT_OK
    where = f"; see {errors_file}" if errors_file else ""
    if getattr(args, "strict", False):
        print(f"error: {n_failed} of {n_total} inputs failed{where} (--strict: the run counts as failed)",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"{n_failed} of {n_total} inputs failed{where}", file=sys.stderr)
    return EXIT_OK


def _writable_dir(d: Path, what: str) -> None:
    """Raise a one-line error unless folder ``d`` (or its nearest existing parent) takes new files."""
    probe = d
    while not probe.exists():
        if probe.is_symlink():
            raise ValueError(f"{what} {d}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {d}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".leukoscope-write-check.", dir=probe)
    except OSError as exc:
        raise ValueError(f"{what} {d}: cannot write in {probe} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def check_out_file(path: str | os.PathLike | None, what: str = "--out") -> None:
    """Check, before any work, that output file ``path`` can be written: not a folder, its folder writable."""
    if not path:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path}: {os.strerror(errno.EACCES).lower()}")
    _writable_dir(path.parent if str(path.parent) else Path("."), what)


def check_out_dir(path: str | os.PathLike | None, what: str = "--out") -> None:
    """Check, before any work, that output folder ``path`` is a folder (or can be made) and takes new files."""
    if not path:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: is a file, not a folder")
    _writable_dir(path, what)


def check_model_path(path: str | os.PathLike) -> None:
    """A clear error for a ``cv`` run folder given where one model is expected.

    A cross-validation run holds one model per fold (``RUN/fold{K}/model.safetensors``), each trained
    without its test fold; none is "the" model to deploy, which ``leukoscope train DATA --out RUN``
    (no ``--split``/``--fold``) trains on all the data."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").exists():
        folds = sorted(p.glob("fold*/model.safetensors"))
        if folds:
            raise ValueError(
                f"{p} is a cross-validation run with {len(folds)} fold models, not one model: pass one fold's "
                f"model (e.g. {folds[0]}), or train the model to deploy on all the data with "
                f"'leukoscope train DATA --out RUN' (no --split/--fold) and pass RUN/model.safetensors")


def add_label_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-map", metavar="FILE",
                   help="CSV (source_label,label) or JSON mapping the dataset's own labels to LMU classes")


def um_per_px_arg(v: str) -> float:
    """argparse ``type`` of every ``--um-per-px``: the one validator's check, as a usage error."""
    try:
        return check_um_per_px(v, "--um-per-px")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_json_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")


def write_json(obj, path: str | None) -> None:
    if path:
        atomic_write_json(obj, path)
        print(f"wrote {path}", file=sys.stderr)


def fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=_json_default)


def _value(v) -> str:
    return "none" if v is None else ("on" if v is True else "off" if v is False else str(v))


#: Integer settings whose option refuses 0 and negative numbers at parse time.
POSITIVE_INT_SETTINGS = frozenset({"batch_size", "per_class"})


def config_option_names() -> list[str]:
    """Destinations of the options :func:`add_config_options` adds: every flat setting with ``cli`` (not off), and ``seed``."""
    return [n for n in FLAT if setting_field(n).metadata.get("cli", True)] + ["seed"]


def add_config_options(p: argparse.ArgumentParser, presets: dict[str, dict] | None = None) -> None:
    """One ``--option`` per :class:`~leukoscope.train.config.TrainConfig` setting, from its field's metadata.

    The option is ``--`` + the flat name with ``-`` for ``_``; its help text is the field's
    ``metadata["help"]`` followed by each preset's value (``presets``: name -> flat config dict);
    ``choices``, ``metavar`` and ``const`` (a value the option takes when given without one) come
    from the metadata too. Booleans get ``--x/--no-x``. Every default is ``None``: an option not
    given leaves the preset's value.
    """
    presets = presets or {}
    groups = {g: p.add_argument_group(_GROUP_TITLES[g] + "; [preset values]" * bool(presets)) for g in GROUPS}
    seed = next(f for f in fields(TrainConfig) if f.name == "seed")
    settings = [(n, setting_field(n), groups[FLAT[n][0]]) for n in config_option_names() if n != "seed"]
    for name, f, g in settings + [("seed", seed, groups["optim"])]:
        md = f.metadata
        help_ = md.get("help", "")
        if presets:
            help_ += " [" + ", ".join(f"{k}: {_value(c.get(name, getattr(TrainConfig(), name)))}"
                                      for k, c in sorted(presets.items())) + "]"
        kw: dict = {"default": None, "help": help_.replace("%", "%%")}
        kind = str(f.type)
        if kind.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            if name in POSITIVE_INT_SETTINGS:
                kw["type"] = positive_int
            for key in ("metavar", "choices"):
                if key in md:
                    kw[key] = md[key]
            if "const" in md:
                kw.update(nargs="?", const=md["const"])
        g.add_argument("--" + name.replace("_", "-"), **kw)


def config_overrides(args: argparse.Namespace) -> dict:
    """The settings given on the command line (options of :func:`add_config_options` not left at ``None``)."""
    return {n: getattr(args, n) for n in config_option_names() if getattr(args, n, None) is not None}
