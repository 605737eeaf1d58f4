"""Seconds per phase of a block (shard read, host-to-device, forwards, Gram passes, OBS, solves,
cache reads and writes, ...), for report.json. The pure functions take an optional `timer` and
wrap their phases in `phase(timer, name)`; without one they pay nothing.

Phases nest: a phase's seconds exclude the phases inside it (a cache read inside a Gram pass
counts as cache read), so the phases of a block add up to the time measured. On a GPU the work
is asynchronous: with `sync` the timer synchronizes the device at every phase boundary (exact
phases, a little slower: `--profile`); without, a phase shows when its results were waited for."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu", sync: bool = False):
        self.sync = sync and torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self.stack: list[list[float]] = []  # [start, seconds of the phases inside] per open phase

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        self.stack.append([self.now(), 0.0])
        try:
            yield
        finally:
            start, inner = self.stack.pop()
            spent = self.now() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            if self.stack:
                self.stack[-1][1] += spent

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in sorted(self.seconds.items())}


def phase(timer: PhaseTimer | None, name: str):
    """`with phase(timer, "gram"):` times the block under `name`; nothing without a timer."""
    return timer.phase(name) if timer is not None else nullcontext()


def timed_batches(batches, timer: PhaseTimer | None, name: str = "cache_read"):
    """The micro-batches of `batches` (an iterator), the time to produce each counted as `name`."""
    it = iter(batches)
    while True:
        with phase(timer, name):
            x = next(it, None)
        if x is None:
            return
        yield x


def add_phases(total: dict[str, float], phases: dict[str, float]) -> dict[str, float]:
    """Phase seconds summed (report totals over blocks)."""
    for k, v in (phases.items() if isinstance(phases, dict) else ()):
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # a hand-edited journal may hold anything
            total[k] = round(total.get(k, 0.0) + v, 3)
    return total
