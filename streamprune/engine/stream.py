"""The streaming engine's one walk over the blocks, shared by the survey, the pruning pass and
evaluation: blocks come in order under one progress bar; each is read from the shards on its own,
its inputs come from the activation cache in micro-batches (a progress tick each) and its outputs
go back to the cache as the next block's inputs."""

from __future__ import annotations

import sys
from typing import Iterator

import torch
from tqdm import tqdm

from ..arch.model import Model
from ..device import compute_dtype
from ..store.cache import ActivationCache, CacheWriter
from ..store.finite import check_finite_weights
from ..store.runlog import BlockProgress, PlainProgress


def progress_bar(desc: str, total: int, start: int = 0, progress: bool = True,
                 unit: str = "block") -> tqdm | PlainProgress:
    """The bar of a walk (a context manager): `total` steps, `start` of them done already; where
    stderr is not a terminal, plain lines instead (runlog.PlainProgress), so a log holds no bar."""
    if progress and not sys.stderr.isatty():
        return PlainProgress(desc, total, start, unit)
    return tqdm(total=total, initial=start, unit=unit, desc=desc, disable=not progress, dynamic_ncols=True)


class BlockStream:
    """`windows` cached windows of `model`'s blocks, `batch` at a time, computed on `device`.

    `resident`: a block's inputs and dense outputs, once read or written, stay on the device for the
    passes after (and the next block's inputs, as they are written), where the memory plan found
    room (plan.Plan.resident_bytes): one read of each per block instead of one per pass. The cache
    files are written all the same (resume), and what stays is what they hold: the same values."""

    def __init__(self, model: Model, cache: ActivationCache, device: torch.device, batch: int, windows: int,
                 resident: bool = False):
        self.model, self.cache, self.device, self.batch, self.windows = model, cache, device, batch, windows
        self.progress = BlockProgress(None)
        self.resident = resident
        self.kept: dict[tuple[int, str], list[torch.Tensor]] = {}  # (block, kind) -> its micro-batches

    @property
    def n_batches(self) -> int:
        """Micro-batches a walk over a block's cached windows has."""
        return len(range(0, self.windows, self.batch))

    def blocks(self, start: int, bar: tqdm | PlainProgress) -> Iterator[int]:
        """Blocks start..L-1; `bar` counts each once the loop body is done with it and shows the
        micro-batches read inside it."""
        self.progress = BlockProgress(None if bar.disable else bar)
        for layer in range(start, self.model.arch.n_layers):
            yield layer
            bar.update(1)

    def read(self, layer: int) -> dict[str, torch.Tensor]:
        """Block `layer`'s weights as stored (memory-mapped, host), refused if not finite."""
        names = self.model.arch.block_tensors(layer)
        W = self.model.index.load(names)
        check_finite_weights(W, names)
        return W

    def dtype(self, stored: dict[str, torch.Tensor]) -> torch.dtype:
        """The dtype a block stored as `stored` is computed in on this device."""
        return compute_dtype(self.device, stored["q"].dtype)

    def batches(self, layer: int, dtype: torch.dtype, kind: str = "inputs",
                tick: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, x) for the micro-batches of block `layer`'s cached `kind` (its inputs, or the
        dense outputs kept beside them), start counted in the cached windows."""
        starts = range(0, self.windows, self.batch)
        kept = self.kept.get((layer, kind))
        if kept is not None and (len(kept) != self.n_batches or any(x.dtype != dtype for x in kept)):
            kept = None
        self.forget_before(layer)
        read: list[torch.Tensor] | None = [] if self.resident and kept is None else None
        for i, start in enumerate(starts):
            if tick:
                self.progress.tick(layer)
            if kept is not None:
                yield start, kept[i]
                continue
            x = self.cache.batch(layer, start, min(start + self.batch, self.windows), self.device, dtype, kind)
            if read is not None:
                read.append(x)
            yield start, x
        if read is not None and len(read) == self.n_batches:
            self.kept[(layer, kind)] = read

    def outputs(self, layer: int) -> CacheWriter:
        """Where block `layer`'s outputs go: the cached inputs of block `layer` + 1."""
        return self.writer(layer + 1)

    def writer(self, layer: int, kind: str = "inputs") -> CacheWriter:
        """A writer of block `layer`'s cached `kind`; resident, what it writes also stays (as the file holds it)."""
        writer = self.cache.writer(layer, kind)
        return KeepingWriter(writer, self, layer, kind) if self.resident else writer

    def forget_before(self, layer: int) -> None:
        """Let go of what stays of the blocks before `layer` (a walk moved on)."""
        for key in [k for k in self.kept if k[0] < layer]:
            del self.kept[key]


class KeepingWriter:
    """A cache writer that also keeps what it writes on the device (BlockStream.resident): once
    committed whole, the later reads of that block's `kind` come from memory. A tensor is kept only
    in the cache's dtype, so it is exactly what the file gives back."""

    def __init__(self, writer: CacheWriter, stream: BlockStream, layer: int, kind: str):
        self.inner, self.stream, self.layer, self.kind = writer, stream, layer, kind
        self.parts: list[torch.Tensor] | None = []

    def write(self, start: int, x: torch.Tensor) -> None:
        self.inner.write(start, x)
        if self.parts is not None and x.dtype == self.stream.cache.dtype and x.shape[0] == min(
                self.stream.batch, self.stream.windows - start) and start == self.stream.batch * len(self.parts):
            self.parts.append(x)
        else:
            self.parts = None  # (not the micro-batches a read gives: not kept)

    def commit(self, durable: bool = True) -> None:
        self.inner.commit(durable)
        if self.parts is not None and len(self.parts) == self.stream.n_batches:
            self.stream.kept[(self.layer, self.kind)] = self.parts
