"""On-disk activation cache: the inputs of block i for every calibration sample, as one
memory-mapped float32 file per block boundary. Only a micro-batch is ever in RAM."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .faults import fault_point, spend_disk
from .fsutil import fsync_dir, no_space

CHUNK_BYTES = 64 * 2**20  # host staging per copy between the cache and the compute device


class ActivationCache:
    def __init__(self, folder: Path, samples: int, seq_len: int, hidden: int):
        self.folder = Path(folder)
        self.shape = (samples, seq_len, hidden)
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def path(self, block: int) -> Path:
        return self.folder / f"inputs-{block:05d}.f32"

    def has(self, block: int) -> bool:
        p = self.path(block)
        return p.is_file() and p.stat().st_size == self.nbytes

    def reader(self, block: int) -> np.memmap:
        return np.memmap(self.path(block), dtype=np.float32, mode="r", shape=self.shape)

    def batch(self, block: int, start: int, stop: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """Samples [start, stop) of block's inputs, copied into a tensor: (b, T, E). Copied a
        chunk at a time, so a GPU micro-batch needs no host copy of its own size."""
        rows = self.reader(block)[start:stop]
        out = torch.empty(rows.shape, dtype=dtype, device=device)
        step = chunk_rows(rows.shape)
        for i in range(0, len(rows), step):
            out[i:i + step] = torch.from_numpy(np.array(rows[i:i + step]))
        return out

    def writer(self, block: int) -> "CacheWriter":
        return CacheWriter(self, block)

    def drop(self, block: int) -> None:
        self.path(block).unlink(missing_ok=True)

    def remove(self) -> None:
        if self.folder.is_dir():
            for p in sorted(self.folder.iterdir()):
                fault_point("cache_delete")
                p.unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)


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

    def __init__(self, cache: ActivationCache, block: int):
        self.final = cache.path(block)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        preallocate(self.tmp, cache.nbytes)
        self.mm = np.memmap(self.tmp, dtype=np.float32, mode="r+", shape=cache.shape)

    def write(self, start: int, x: torch.Tensor) -> None:
        fault_point("cache_write")
        step = chunk_rows(x.shape)
        for i in range(0, x.shape[0], step):
            part = x[i:i + step].detach().float().cpu().numpy()
            self.mm[start + i:start + i + len(part)] = part

    def commit(self) -> None:
        self.mm.flush()
        del self.mm
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
