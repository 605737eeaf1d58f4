"""One run per output folder. The run holds an exclusive flock on OUT/.streamprune/lock, a file
that also records its pid for the message a second run prints. The kernel drops a flock when
the process holding it dies, kill -9 included, so a lock file left behind by a dead run is not
a lock at all: the next run simply takes it."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import StreamPruneError
from .journal import WORKDIR

LOCK_NAME = "lock"


def lock_path(out: Path) -> Path:
    return Path(out) / WORKDIR / LOCK_NAME


def read_lock_owner(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 64).decode(errors="replace").strip() or "unknown"


class OutputLock:
    """`with OutputLock(out):` holds the output folder for this process, or refuses."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(out)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = read_lock_owner(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if owner is None:
                raise StreamPruneError(f"cannot lock {self.path}: {e.strerror}") from None
            raise StreamPruneError(f"another streamprune run (pid {owner}) is writing to {self.out}; "
                                   "wait for it to finish or stop it, then re-run") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        # the file stays: unlinking it could let a third run lock a fresh file while a second
        # run still waits on the old one
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
