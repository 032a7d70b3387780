"""Option helpers shared by command modules (TIAToolbox-style): one definition per option."""

from __future__ import annotations

import argparse
import json
import sys


def add_label_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-map", metavar="FILE",
                   help="CSV (source_label,label) or JSON mapping the dataset's own labels to LMU classes")


def add_json_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")


def write_json(obj, path: str | None) -> None:
    if path:
        from leukoscope.io import atomic_write_json

        atomic_write_json(obj, path)
        print(f"wrote {path}", file=sys.stderr)


def fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def dumps(obj) -> str:
    from leukoscope.io import _json_default

    return json.dumps(obj, indent=2, default=_json_default)
