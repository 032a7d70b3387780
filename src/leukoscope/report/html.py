"""Render the report page from the Jinja2 template ``templates/report.html``.

The template receives plain values (numbers, strings, base64 PNGs); the filters below
format numbers the same way everywhere: ``num`` (``n/a`` for a missing value), ``pm``
(mean +- sd) and ``ci`` (``[lo, hi]``).
"""

from __future__ import annotations

import math
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x, nd: int = 3) -> str:
    """``x`` with ``nd`` decimals, ``n/a`` when missing (None or NaN)."""
    if _missing(x):
        return "n/a"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    return f"{float(x):.{nd}f}"


def pm(mean, sd, nd: int = 3) -> str:
    """``mean ± sd``; just ``mean`` when sd is missing; ``n/a`` when the mean is."""
    if _missing(mean):
        return "n/a"
    return num(mean, nd) if _missing(sd) else f"{num(mean, nd)} ± {num(sd, nd)}"


def ci(d: dict | None, nd: int = 3) -> str:
    """``[lo, hi]`` of an interval dict, empty when there is none."""
    if not d or _missing(d.get("lo")) or _missing(d.get("hi")):
        return ""
    return f"[{num(d['lo'], nd)}, {num(d['hi'], nd)}]"


def environment():
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, pm=pm, ci=ci)
    env.tests["missing"] = _missing
    return env


def render_report(context: dict, template: str = "report.html") -> str:
    """The report page as a string (see :func:`leukoscope.report.build.make_report` for the context)."""
    return environment().get_template(template).render(**context)
