"""Hooks for the fault harness (tools/fault_bench.py, tests/hostile/test_faults.py). Every hook is a
no-op unless its environment variable is set, so a normal run pays one dict lookup per call.

STREAMPRUNE_FAULT_POINT=name:count[:INT]  the count-th time the process passes the point `name`
    it sends itself SIGKILL (SIGINT with `:INT`).
STREAMPRUNE_FAULT_RANK=k  only the process of rank k (torchrun's RANK; 0 without torchrun) is hit.
STREAMPRUNE_DISK_LIMIT=bytes  writes through fsutil fail with ENOSPC once this process has
    written that many bytes (a disk that fills up during the run)."""

from __future__ import annotations

import errno
import os
import signal
import threading

FAULT_POINT = "STREAMPRUNE_FAULT_POINT"
FAULT_RANK = "STREAMPRUNE_FAULT_RANK"
DISK_LIMIT = "STREAMPRUNE_DISK_LIMIT"
POINTS = ("shard_read", "after_scoring", "shard_mid_write", "shard_before_rename", "before_journal",
          "journal_mid_write", "journal_before_rename", "cache_write", "cache_delete", "final_files",
          "file_before_rename")

_lock = threading.Lock()
_passes: dict[str, int] = {}
_written = 0


def fault_point(name: str) -> None:
    """Kill this process here if STREAMPRUNE_FAULT_POINT asks for it."""
    spec = os.environ.get(FAULT_POINT)
    if not spec:
        return
    target, count, *how = spec.split(":")
    if target != name or os.environ.get(FAULT_RANK, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        hit = _passes[name] == int(count)
    if hit:
        os.kill(os.getpid(), signal.SIGINT if how == ["INT"] else signal.SIGKILL)


def spend_disk(nbytes: int) -> None:
    """Account for `nbytes` about to be written; ENOSPC past STREAMPRUNE_DISK_LIMIT."""
    limit = os.environ.get(DISK_LIMIT)
    if limit is None:
        return
    global _written
    with _lock:
        if _written + nbytes > int(limit):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _written += nbytes


def reset() -> None:
    """Forget passes and bytes written (for tests that run several pipelines in one process)."""
    global _written
    with _lock:
        _passes.clear()
        _written = 0


class LimitedFile:
    """A binary file whose writes count against STREAMPRUNE_DISK_LIMIT."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        spend_disk(len(data))
        return self.f.write(data)


def limit_disk(f):
    return LimitedFile(f) if DISK_LIMIT in os.environ else f
