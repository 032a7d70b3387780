"""CPU thread count tuned while training (:class:`ThreadTuner`)."""

from __future__ import annotations

import torch


class ThreadTuner:
    """Pick the faster CPU thread count while training, re-measured every ``period`` steps.

    On a CPU shared with other jobs, torch's OpenMP threads waiting at barriers for a
    descheduled sibling can make a step 5-20x slower than with a single thread; on an idle
    CPU all threads are faster. So every ``period`` steps, ``probe`` steps run with each
    candidate count and the rest of the period uses the one with the shortest step.
    """

    def __init__(self, max_threads: int, period: int = 30, probe: int = 3, enabled: bool = True):
        self.options = [max_threads, 1] if (enabled and max_threads > 1) else [max_threads]
        self.period, self.probe = period, probe
        self.choice = max_threads
        self.k = 0
        self._times: dict[int, list[float]] = {}
        self._current = max_threads
        torch.set_num_threads(max_threads)

    def before_step(self) -> None:
        if len(self.options) == 1:
            return
        pos = self.k % self.period
        n_probe = self.probe * len(self.options)
        if pos == 0:
            self._times = {o: [] for o in self.options}
        if pos < n_probe:
            want = self.options[pos // self.probe]
        else:
            if pos == n_probe:
                self.choice = min(self._times, key=lambda o: min(self._times[o]) if self._times[o] else float("inf"))
            want = self.choice
        if want != self._current:
            torch.set_num_threads(want)
            self._current = want

    def after_step(self, seconds: float) -> None:
        pos = self.k % self.period
        if len(self.options) > 1 and pos < self.probe * len(self.options):
            self._times[self._current].append(seconds)
        self.k += 1


def tuner_for(device, threads: str, distributed: bool) -> ThreadTuner:
    """The tuner of a run: on CPU ``threads`` (``"auto"``: tuned unless distributed, or a number); else fixed."""
    if torch.device(device).type != "cpu":
        return ThreadTuner(torch.get_num_threads(), enabled=False)
    max_threads = int(threads) if str(threads).isdigit() else torch.get_num_threads()
    return ThreadTuner(max_threads, enabled=str(threads) == "auto" and not distributed)
