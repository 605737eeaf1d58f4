"""The survey: a first streaming pass over every block, before any is cut. Each block runs dense on
its calibration inputs (the dense outputs of the block before it), and what each of its cuts would
cost (costs.py) goes into the journal; nothing is written to the output. One block in memory at
a time, resumable block by block like the pruning pass. The allocation then decides every
block's shape from these costs at once (allocation.py)."""

from __future__ import annotations

import logging
import time

import torch

from ..planning.validate import check_finite_activations
from ..pruning.costs import BlockCosts, block_costs
from ..pruning.phases import PhaseTimer
from ..store.journal import Journal
from ..store.runlog import FILE_ONLY
from .context import RunContext
from .stream import progress_bar

log = logging.getLogger(__name__)


def survey(ctx: RunContext, journal: Journal) -> list[BlockCosts]:
    """Costs of every block; blocks already surveyed (journal) are not run again. Expects the cache
    to hold the inputs of the first block not surveyed yet; leaves only block 0's (the embeddings,
    which the pruning pass starts from: written once, not twice) behind. With several ranks, the
    cache holds this rank's share of the windows; every rank gets rank 0's costs, and rank 0
    journals them once every rank's next inputs are durable."""
    model, cache, ranks = ctx.model, ctx.cache, ctx.ranks
    L, start, stream = model.arch.n_layers, len(journal.surveyed), ctx.stream()
    if start < L:
        log.info("survey: %d blocks%s", L, f" (resuming: {start} of {L} blocks done)" if start else "",
                 extra={} if start else FILE_ONLY)  # the bar says the rest
    with progress_bar("survey", L, start, ctx.cfg.progress) as bar:
        for layer in stream.blocks(start, bar):
            t0, timer = time.time(), PhaseTimer(ctx.device, ctx.cfg.profile)
            with timer.phase("shard_read"):
                stored = stream.read(layer)
            dtype = stream.dtype(stored)
            with timer.phase("to_device"):
                W = {k: t.to(ctx.device, dtype) for k, t in stored.items()}
            del stored
            writer = stream.outputs(layer)

            def write(s: int, y: torch.Tensor) -> None:
                check_finite_activations(y, layer, s)
                writer.write(s, y)

            with torch.no_grad():
                costs = block_costs(W, model.arch.blocks[layer], ctx.calibration(stream, layer, dtype, timer),
                                    ctx.cfg.compensation.refits, write)
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
    if start < L:
        cache.drop(L)  # the dense outputs of the last block: nothing reads them
    return [BlockCosts.from_json(journal.surveyed[str(i)]) for i in range(L)]
