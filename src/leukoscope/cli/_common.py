"""Option helpers shared by command modules (TIAToolbox-style): one definition per option."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from leukoscope.imaging.scale_policy import check_um_per_px
from leukoscope.io import _json_default, atomic_write_json
from leukoscope.train.config import FLAT, GROUPS, TrainConfig, setting_field

#: Titles of the option groups of ``train``/``cv``, one per config group.
_GROUP_TITLES = {"arch": "model", "optim": "schedule (epochs, batches, learning rate, early stopping)",
                 "augment": "augmentation (training only)", "scaling": "scale and colour of the input",
                 "runtime": "runtime (free to change when resuming)",
                 "finetune": "fine-tuning (starting from a trained model; all off by default)"}


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
            for key in ("metavar", "choices"):
                if key in md:
                    kw[key] = md[key]
            if "const" in md:
                kw.update(nargs="?", const=md["const"])
        g.add_argument("--" + name.replace("_", "-"), **kw)


def config_overrides(args: argparse.Namespace) -> dict:
    """The settings given on the command line (options of :func:`add_config_options` not left at ``None``)."""
    return {n: getattr(args, n) for n in config_option_names() if getattr(args, n, None) is not None}
