"""One progress display for the whole package: a bar on a terminal, plain lines in a log, or nothing.

Every module that shows progress imports :class:`tqdm` from here instead of from ``tqdm``. The mode
(:data:`MODES`) is process-wide: :func:`set_mode` (the command line's ``--progress``) or the
``LEUKOSCOPE_PROGRESS`` environment variable, default ``auto``:

* ``bar``: tqdm's bar (``\\r`` updates), as in a terminal;
* ``plain``: one ordinary line per 10 % of the work or per 30 s, whichever comes first, and one at
  the end; never a ``\\r``, so a log file stays readable;
* ``none``: nothing;
* ``auto``: ``bar`` when standard error is a terminal, else ``plain``.

A caller's own ``disable=True`` (its ``progress=False``) always wins.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

#: The progress modes, as ``--progress`` takes them.
MODES = ("auto", "bar", "plain", "none")
#: A plain line at least every this fraction of the total ...
PLAIN_STEP = 0.10
#: ... or every this many seconds, whichever comes first.
PLAIN_SECONDS = 30.0

_mode = os.environ.get("LEUKOSCOPE_PROGRESS", "auto")


def set_mode(mode: str) -> None:
    """Set the process-wide progress mode (one of :data:`MODES`); child processes inherit it."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode
    os.environ["LEUKOSCOPE_PROGRESS"] = mode


def get_mode() -> str:
    """The effective mode: ``auto`` resolved to ``bar`` or ``plain`` by whether stderr is a terminal."""
    mode = _mode if _mode in MODES else "auto"
    if mode == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return "bar" if isatty is not None and isatty() else "plain"
    return mode


class _PlainProgress(_std_tqdm):
    """tqdm that writes whole lines (``desc: 40% 4/10 [...]``) at most every 10 % or 30 s."""

    def __init__(self, *args, **kwargs):
        self._next_frac = PLAIN_STEP
        self._last_line = None
        kwargs.setdefault("mininterval", 0.5)
        kwargs.setdefault("ascii", True)  # a log file gets plain characters
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):  # noqa: ARG002 (tqdm's signature)
        now = time.time()
        frac = self.n / self.total if self.total else 0.0
        due = (self._last_line is None and self.n > 0) or frac >= self._next_frac or (
            self._last_line is not None and now - self._last_line >= PLAIN_SECONDS)
        if due:
            self._line()
            while self._next_frac <= frac:
                self._next_frac += PLAIN_STEP
        return True

    def _line(self) -> None:
        self._last_line, self._last_n = time.time(), self.n
        self.fp.write(self.__str__().replace("\r", "").strip() + "\n")
        self.fp.flush()

    def close(self):
        if self.disable:
            return
        if self.n and self.n != getattr(self, "_last_n", None):  # the final count, once
            self._line()
        self.disable = True  # tqdm's own close would write '\r'
        self._decr_instances(self)


def tqdm(*args, **kwargs):
    """A progress bar in the process-wide mode (see the module docstring); same arguments as tqdm's."""
    mode = get_mode()
    if mode == "none":
        kwargs["disable"] = True
        return _std_tqdm(*args, **kwargs)
    if mode == "plain":
        return _PlainProgress(*args, **kwargs)
    return _auto_tqdm(*args, **kwargs)
