"""On-disk activation cache: the inputs of block i for every calibration sample, as one
memory-mapped file per block boundary, in the run's compute dtype (fp32 on a CPU; bf16 or fp16 on
a GPU running the model in it: the values the GPU computes are all in that dtype, so the narrower
files lose nothing and halve the I/O). Only a micro-batch is ever in RAM.

A run's cache folder belongs to that run alone: it is created by streamprune, carries an owner
mark naming the output folder and the run, and removing it deletes only the files streamprune
names (never a user's file, never the folder given as --cache-dir)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import StreamPruneError
from .faults import fault_point, spend_disk
from .fsutil import TMP_SUFFIX, atomic_write_json, fsync_dir, no_space

CHUNK_BYTES = 64 * 2**20  # host staging per copy between the cache and the compute device
OWNER_MARK = "streamprune-cache.json"
# what a cache folder may hold besides the mark
OWN_FILE = re.compile(r"(inputs|targets|probes)-\d{5}\.(f32|bf16|f16)(\.tmp)?")
EVAL_PREFIX = "streamprune-eval-"  # temporary caches of evaluations (a run's: inside its cache folder)


def run_cache_folder(out: Path, workdir: Path, cache_dir: Path | None) -> Path:
    """The cache folder of the run into `out`: in its work folder, or a folder of its own inside
    --cache-dir, named after the output folder, so runs into different outputs never share one."""
    if cache_dir is None:
        return Path(workdir) / "cache"
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"streamprune-cache-{key}"


def cache_owner(folder: Path) -> dict | None:
    try:
        owner = json.loads((Path(folder) / OWNER_MARK).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def own_entry(p: Path) -> bool:
    """A name streamprune writes in a cache folder (its files, their temporaries, the mark)."""
    if p.is_dir() and not p.is_symlink():
        return p.name.startswith(EVAL_PREFIX)
    return bool(OWN_FILE.fullmatch(p.name)) or p.name in (OWNER_MARK, OWNER_MARK + TMP_SUFFIX)


def check_cache_folder(folder: Path, out: Path) -> None:
    """Refuse a cache folder that exists, is not empty and is not this output's (up front, writes nothing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StreamPruneError(f"activation cache folder {folder} exists and is not a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    owner = cache_owner(folder)
    if owner is None:  # only names streamprune writes is a run killed before its mark was in place
        if not all(own_entry(p) for p in folder.iterdir()):
            raise StreamPruneError(f"activation cache folder {folder} is not empty and was not made by streamprune; "
                                   "choose another --cache-dir")
        return
    if owner.get("out") != str(Path(out).resolve()):
        raise StreamPruneError(f"activation cache folder {folder} belongs to the run into {owner.get('out')}; "
                               "choose another --cache-dir")


# how each dtype is stored: file suffix and the numpy type of its bits (bf16 as raw 16-bit words)
STORED = {torch.float32: ("f32", np.float32), torch.bfloat16: ("bf16", np.int16), torch.float16: ("f16", np.float16)}


class ActivationCache:
    def __init__(self, folder: Path, samples: int, seq_len: int, hidden: int, dtype: torch.dtype = torch.float32):
        self.folder = Path(folder)
        self.shape = (samples, seq_len, hidden)
        self.dtype = dtype
        self.suffix, self.np_dtype = STORED[dtype]
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def claim(cls, folder: Path, out: Path, run_id: str, samples: int, seq_len: int, hidden: int,
              dtype: torch.dtype = torch.float32) -> "ActivationCache":
        """The cache of run `run_id` into `out`. What another run (an earlier one into the same
        output, restarted) left in the folder is deleted, so stale activations are never read."""
        check_cache_folder(folder, out)
        cache = cls(folder, samples, seq_len, hidden, dtype)
        owner = cache_owner(cache.folder)
        if owner is None or owner.get("run") != run_id:
            cache.remove_contents()
            atomic_write_json(cache.folder / OWNER_MARK, {"out": str(Path(out).resolve()), "run": run_id})
        return cache

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.itemsize

    @property
    def itemsize(self) -> int:
        return np.dtype(self.np_dtype).itemsize

    def path(self, block: int, kind: str = "inputs") -> Path:
        """The file of block's inputs, or (kind "targets") of its dense outputs on them, kept
        between the passes of the pruning pass over that block."""
        return self.folder / f"{kind}-{block:05d}.{self.suffix}"

    def has(self, block: int) -> bool:
        p = self.path(block)
        return p.is_file() and p.stat().st_size == self.nbytes

    def reader(self, block: int, kind: str = "inputs") -> np.memmap:
        return np.memmap(self.path(block, kind), dtype=self.np_dtype, mode="r", shape=self.shape)

    def from_stored(self, rows: np.ndarray) -> torch.Tensor:
        """Rows read from a file as a tensor of the cache's dtype."""
        t = torch.from_numpy(np.array(rows))
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def to_stored(self, x: torch.Tensor) -> np.ndarray:
        """A tensor as the file stores it (in the cache's dtype: exact for the values it computes)."""
        x = x.detach().to(self.dtype).cpu()
        return (x.view(torch.int16) if self.dtype == torch.bfloat16 else x).numpy()

    def batch(self, block: int, start: int, stop: int, device="cpu", dtype=torch.float32,
              kind: str = "inputs") -> torch.Tensor:
        """Samples [start, stop) of block's inputs, copied into a tensor: (b, T, E). Copied a
        chunk at a time, so a GPU micro-batch needs no host copy of its own size."""
        rows = self.reader(block, kind)[start:stop]
        out = torch.empty(rows.shape, dtype=dtype, device=device)
        step = chunk_rows(rows.shape)
        for i in range(0, len(rows), step):
            out[i:i + step] = self.from_stored(rows[i:i + step])
        return out

    def writer(self, block: int, kind: str = "inputs") -> "CacheWriter":
        return CacheWriter(self, block, kind)

    def drop(self, block: int) -> None:
        """Delete block's inputs and the dense outputs kept beside them."""
        self.path(block).unlink(missing_ok=True)
        self.path(block, "targets").unlink(missing_ok=True)

    def remove_contents(self) -> None:
        """Delete the files streamprune writes here (and leftover evaluation caches), nothing else."""
        if not self.folder.is_dir():
            return
        for p in sorted(self.folder.iterdir()):
            if not own_entry(p) or p.name == OWNER_MARK:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                fault_point("cache_delete")
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the cache: its own files, its mark, then the folder if nothing else is left in it."""
        self.remove_contents()
        (self.folder / OWNER_MARK).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # gone already, or holds something streamprune did not write
            pass


def chunk_rows(shape) -> int:
    """Samples per host copy: as many as fit in CHUNK_BYTES of fp32, at least one."""
    return max(1, CHUNK_BYTES // (4 * int(np.prod(shape[1:]))))


def preallocate(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` of disk really reserved: writing through a memory map into a
    sparse file on a full disk kills the process (SIGBUS); reserving first gives ENOSPC here."""
    with open(path, "wb") as f:
        try:
            spend_disk(nbytes)
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                f.truncate(nbytes)
        except OSError as e:
            f.close()
            path.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise no_space(path) from None
            raise


class CacheWriter:
    """Writes block inputs sample-range by sample-range to a temporary file; commit() makes
    them durable and visible under the final name, so a crash never leaves a partial file."""

    def __init__(self, cache: ActivationCache, block: int, kind: str = "inputs"):
        self.cache, self.final = cache, cache.path(block, kind)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        preallocate(self.tmp, cache.nbytes)
        self.mm = np.memmap(self.tmp, dtype=cache.np_dtype, mode="r+", shape=cache.shape)

    def write(self, start: int, x: torch.Tensor) -> None:
        fault_point("cache_write")
        step = chunk_rows(x.shape)
        for i in range(0, x.shape[0], step):
            part = self.cache.to_stored(x[i:i + step])
            self.mm[start + i:start + i + len(part)] = part

    def commit(self, durable: bool = True) -> None:
        """Make the file visible; `durable`: on disk first (a scratch file, which a resumed run
        writes again, need not be)."""
        if durable:
            self.mm.flush()
        del self.mm
        if durable:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(self.tmp, self.final)
        if durable:
            fsync_dir(self.final.parent)
