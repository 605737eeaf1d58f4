"""Which file `streamprune export --gguf` may write. The tool deletes or replaces only what it wrote:
an existing GGUF file (replaced, with a line saying so) and the unfinished file of an interrupted export
(removed). Everything else is refused in one line before any work: a folder, the model's own files, any
file that is not a GGUF file. The file is written under a temporary name beside the target and renamed
when complete, so the target never holds a partial file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import StreamPruneError

MAGIC = b"GGUF"


def partial_path(out: Path) -> Path:
    """Where the file is written until it is complete."""
    return out.with_name(f".{out.name}.partial")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Target:
    path: Path
    replaces: bool  # an existing GGUF file is there
    stale_partial: Path | None  # an interrupted export's unfinished file, to remove


def check_target(out: Path, folder: Path) -> Target:
    """Refuse, before any work, a --gguf that is not ours to write (one line each)."""
    out = Path(out)
    if out.is_dir():
        raise StreamPruneError(f"--gguf {out} is a folder; give a file name, e.g. {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise StreamPruneError(f"--gguf: folder {out.parent} does not exist")
    own = _model_file(out, Path(folder))
    if own is not None:
        raise StreamPruneError(f"--gguf {out} is the model's own file {own.name} (in {folder}); give the GGUF file "
                               "a new name")
    exists = out.exists() or out.is_symlink()
    if exists and not (out.is_file() and is_gguf(out)):
        raise StreamPruneError(f"--gguf {out} exists and is not a GGUF file; export replaces only a GGUF file (give "
                               "a new name)")
    partial = partial_path(out)
    stale = None
    if partial.exists() or partial.is_symlink():
        if partial.is_symlink() or not partial.is_file() or (partial.stat().st_size and not is_gguf(partial)):
            raise StreamPruneError(f"{partial} is in the way of the export to {out.name} and is not an unfinished "
                                   "export; remove it or give another name")
        stale = partial
    return Target(out, exists, stale)


def _model_file(out: Path, folder: Path) -> Path | None:
    """The file of the model folder that `out` is (itself, or through a link), if any."""
    if not folder.is_dir() or not out.exists():
        return None
    for p in folder.iterdir():
        try:
            if p.is_file() and os.path.samefile(p, out):
                return p
        except OSError:
            continue
    return None
