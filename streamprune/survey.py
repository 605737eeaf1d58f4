"""The survey: a first streaming pass over every block, before any is cut. Each block runs dense on
its calibration inputs (the dense outputs of the block before it), and what each of its cuts would
cost (costs.py) goes into the journal; nothing is written to the output. One block in memory at
a time, resumable block by block like the pruning pass. The allocation then decides every
block's shape from these costs at once (allocation.py)."""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from .cache import ActivationCache
from .costs import BlockCosts, block_costs
from .distributed import SINGLE, Ranks, Share
from .journal import Journal
from .model import Model, block_generator, compute_dtype
from .numerics import ON_DEVICE, GramPlacement
from .phases import PhaseTimer
from .runlog import FILE_ONLY, BlockProgress
from .validate import check_finite_activations, check_finite_weights

log = logging.getLogger(__name__)


def survey(model: Model, cache: ActivationCache, journal: Journal, batch: int, device: torch.device, cos, sin,
           refit: bool, seed: int, progress: bool, profile: bool = False,
           placement: GramPlacement = ON_DEVICE, ranks: Ranks = SINGLE, share: Share | None = None
           ) -> list[BlockCosts]:
    """Costs of every block; blocks already surveyed (journal) are not run again. Expects the cache
    to hold the inputs of the first block not surveyed yet; leaves only block 0's (the embeddings,
    which the pruning pass starts from: written once, not twice) behind. With
    several ranks, the cache holds this rank's `share` of the windows; every rank gets rank 0's
    costs, and rank 0 journals them once every rank's next inputs are durable."""
    L, samples = model.arch.n_layers, cache.shape[0]
    share = share or Share(samples, batch, range(samples))
    start = len(journal.surveyed)
    if start < L:
        log.info("survey: %d blocks%s", L, f" (resuming: {start} of {L} blocks done)" if start else "",
                 extra={} if start else FILE_ONLY)  # the bar says the rest
    bar = tqdm(total=L, initial=start, unit="block", desc="survey", disable=not progress, dynamic_ncols=True)
    within = BlockProgress(bar if progress else None)
    try:
        for layer in range(start, L):
            t0, timer = time.time(), PhaseTimer(device, profile)
            names = model.arch.block_tensors(layer)
            with timer.phase("shard_read"):
                stored = model.index.load(names)
                check_finite_weights(stored, names)
            dtype = compute_dtype(device, stored["q"].dtype)
            with timer.phase("to_device"):
                W = {k: t.to(device, dtype) for k, t in stored.items()}
            del stored
            writer = cache.writer(layer + 1)

            def batches():
                for s in range(0, samples, batch):
                    within.tick(layer)
                    yield cache.batch(layer, s, min(s + batch, samples), device, dtype)

            def write(s: int, y: torch.Tensor) -> None:
                check_finite_activations(y, layer, s)
                writer.write(s, y)

            with torch.no_grad():
                generator = block_generator(seed, layer)
                costs = block_costs(W, model.arch.blocks[layer], batches, cos, sin, refit, write, share.samples,
                                    generator, timer, placement, ranks, share.batch_sizes, share.local)
            writer.commit()
            ranks.barrier()  # every rank's inputs of the next block are on disk
            record = dict(costs.as_json(), seconds=round(time.time() - t0, 3), phases=timer.rounded())
            if ranks.is_writer:
                journal.finish_survey_block(layer, record)
            record = ranks.broadcast(record)  # sent once rank 0 journaled it: every rank allocates alike
            if not ranks.is_writer:
                journal.finish_survey_block(layer, record)  # (its journal is an in-memory copy)
            log.info("surveyed block %d (%.1fs)", layer, time.time() - t0, extra=FILE_ONLY)
            if layer > 0:
                cache.drop(layer)
            bar.update(1)
    finally:
        bar.close()
    if start < L:
        cache.drop(L)  # the dense outputs of the last block: nothing reads them
    return [BlockCosts.from_json(journal.surveyed[str(i)]) for i in range(L)]
