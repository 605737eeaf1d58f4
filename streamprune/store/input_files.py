"""Input files read safely: regular files only (a FIFO, a device or a folder is refused before
any blocking open), and JSON of bounded size whose every failure is one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import StreamPruneError

MAX_JSON = 100_000_000  # config.json and the index: far above any real one


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    return next((what for test, what in FILE_KINDS if test(mode)), "not a regular file")


def is_input_file(path: Path) -> bool:
    """True for a regular file (through symlinks), False when nothing is there. Refuses a FIFO,
    a device, a socket or a folder: reading one blocks forever or never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StreamPruneError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the name
        raise StreamPruneError(f"invalid file name {str(path)!r}") from None
    if not stat.S_ISREG(mode):
        raise StreamPruneError(f"{path} is {file_kind(mode)}, not a regular file")
    return True


def open_input(path: Path) -> BinaryIO:
    """Open a regular input file for reading (FileNotFoundError when there is none). O_NONBLOCK,
    so that even a FIFO put there after is_input_file looked cannot block the open (fstat then
    refuses it); it stays set, which changes nothing for a regular file on a disk."""
    is_input_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StreamPruneError(f"cannot read {path}: {e.strerror or e}") from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise StreamPruneError(f"{path} is {file_kind(mode)}, not a regular file")
    return f


def check_folder_files(folder: Path) -> None:
    """Every entry of a model folder is a regular file or a folder (through symlinks): the
    tokenizer loader and the copy of the other files would block on a FIFO or read a device
    forever. Dangling symlinks are left to whoever needs the file."""
    for entry in sorted(Path(folder).iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise StreamPruneError(f"{entry} is {file_kind(mode)}, not a regular file; remove it from the model folder")


def parse_json(raw: bytes, invalid: str, **hooks):
    """JSON from UTF-8 bytes, any failure as one StreamPruneError starting with `invalid`."""
    try:
        return json.loads(raw.decode("utf-8"), **hooks)
    except UnicodeDecodeError as e:
        raise StreamPruneError(f"{invalid}: not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise StreamPruneError(f"{invalid}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
        raise StreamPruneError(f"{invalid}: {str(e).splitlines()[0][:200]}") from None


def read_json(path: Path, invalid: str):
    """A JSON file (config.json, the index) of at most MAX_JSON bytes."""
    with open_input(path) as f:
        raw = f.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise StreamPruneError(f"{invalid}: larger than {MAX_JSON} bytes")
    return parse_json(raw, invalid)
