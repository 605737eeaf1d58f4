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
    """`windows` cached windows of `model`'s blocks, `batch` at a time, computed on `device`."""

    def __init__(self, model: Model, cache: ActivationCache, device: torch.device, batch: int, windows: int):
        self.model, self.cache, self.device, self.batch, self.windows = model, cache, device, batch, windows
        self.progress = BlockProgress(None)

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
        for start in range(0, self.windows, self.batch):
            if tick:
                self.progress.tick(layer)
            yield start, self.cache.batch(layer, start, min(start + self.batch, self.windows), self.device, dtype,
                                          kind)

    def outputs(self, layer: int) -> CacheWriter:
        """Where block `layer`'s outputs go: the cached inputs of block `layer` + 1."""
        return self.cache.writer(layer + 1)
