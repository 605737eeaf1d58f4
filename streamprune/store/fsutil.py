"""Crash-safe file writes: write to a temporary name, fsync, rename, fsync the directory.
A full disk becomes one clear error and never a partial file under the final name."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import StreamPruneError
from .faults import fault_point, limit_disk

TMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_kind(path: Path) -> str:
    """What a file is, for naming fault points: journal, shard or file."""
    if path.name == "journal.json":
        return "journal"
    return "shard" if path.suffix == ".safetensors" else "file"


def no_space(path: Path) -> StreamPruneError:
    return StreamPruneError(f"no space left on device while writing {path}; "
                            "free some space and re-run the same command to resume")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, then make it appear as `path` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(limit_disk(f))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise no_space(path) from None
        raise
    fault_point(write_kind(path) + "_before_rename")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(f):
        half = len(data) // 2
        f.write(data[:half])
        fault_point(write_kind(Path(path)) + "_mid_write")
        f.write(data[half:])
    atomic_write(path, write)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed run left in `folder` (call with the output lock held)."""
    if Path(folder).is_dir():
        for p in Path(folder).glob("*" + TMP_SUFFIX):
            p.unlink(missing_ok=True)
