"""The survey: a first streaming pass over every block, before any is cut. Each block runs dense on
its calibration inputs (the dense outputs of the block before it), and what each of its cuts would
cost (costs.py) goes into the journal; nothing is written to the output. One block in memory at
a time, resumable block by block like the pruning pass. The allocation then decides every
block's shape from these costs at once (allocation.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..arch.spec import FINAL_NORM, Architecture
from ..config import RunConfig
from ..pruning.allocation import allocate
from ..pruning.costs import BlockCosts, block_costs, held_out_survey
from ..pruning.phases import PhaseTimer
from ..pruning.preview import BlockShape, Preview, preview
from ..pruning.sensitivity import (
    KINDS,
    final_states,
    probe_shape,
    sensitivities,
    start_probes,
    stream_count,
    through,
    top_kl,
    top_logits,
    top_tokens,
    weigh,
)
from ..store.cache import ActivationCache
from ..store.finite import check_finite_activations
from ..store.journal import Journal
from ..store.runlog import FILE_ONLY
from .context import RunContext
from .stream import progress_bar

log = logging.getLogger(__name__)
STREAM_GROUP_BYTES = 256 * 2**20  # probe streams (or lm_head rows) in memory at once


def survey(ctx: RunContext, journal: Journal) -> list[BlockCosts]:
    """Costs of every block; held out where the calibration is scarce (costs.held_out_survey), and
    then weighed by the blocks' sensitivities (sensitivity.py; rank 0's probe streams, kept beside
    the cache); blocks already surveyed (journal) are not run again. Expects the cache
    to hold the inputs of the first block not surveyed yet; leaves only block 0's (the embeddings,
    which the pruning pass starts from: written once, not twice) behind. With several ranks, the
    cache holds this rank's share of the windows; every rank gets rank 0's costs, and rank 0
    journals them once every rank's next inputs are durable."""
    model, cache, ranks = ctx.model, ctx.cache, ctx.ranks
    L, start, stream = model.arch.n_layers, len(journal.surveyed), ctx.stream()
    if start < L:
        log.info("survey: %d blocks%s", L, f" (resuming: {start} of {L} blocks done)" if start else "",
                 extra={} if start else FILE_ONLY)  # the bar says the rest
    held = held_out_survey(model.arch.blocks, ctx.cfg.samples * ctx.cfg.seq_len)
    probes = ProbeStreams(ctx) if ranks.is_writer and held else None
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

            cuts: dict | None = {} if probes is not None else None  # the reference cuts, for the probes alone
            with torch.no_grad():
                costs = block_costs(W, model.arch.blocks[layer], ctx.calibration(stream, layer, dtype, timer),
                                    ctx.cfg.compensation.refits, write, cuts, held)
            writer.commit()
            measured = {}
            if probes is not None:
                with timer.phase("survey_probes"), torch.no_grad():
                    measured = probes.step(layer, W, cuts, dtype)
            ranks.barrier()  # every rank's inputs of the next block are on disk
            record = dict(costs.as_json(), **measured, seconds=round(time.time() - t0, 3), phases=timer.rounded())
            if ranks.is_writer:
                journal.finish_survey_block(layer, record)
            record = ranks.broadcast(record)  # sent once rank 0 journaled it: every rank allocates alike
            if not ranks.is_writer:
                journal.finish_survey_block(layer, record)  # (its journal is an in-memory copy)
            log.info("surveyed block %d (%.1fs)", layer, time.time() - t0, extra=FILE_ONLY)
            if probes is not None:
                probes.drop(layer - 1)
            if layer > 0:
                cache.drop(layer)
    if start < L:
        cache.drop(L)  # the dense outputs of the last block: nothing reads them
        if probes is not None:
            probes.drop(L - 1)
    records = [journal.surveyed[str(i)] for i in range(L)]
    return weigh([BlockCosts.from_json(r) for r in records], measured_sensitivities(records))


def measured_sensitivities(records: list[dict]) -> list[tuple[float, float]] | None:
    """The blocks' sensitivities from their survey records (None: a survey that measured none)."""
    if not records or "sensitivity" not in records[-1] or any("probe" not in r for r in records):
        return None
    return sensitivities(records[-1]["sensitivity"], [r["probe"] for r in records])


class ProbeStreams:
    """The probe streams (sensitivity.py) of this rank's first windows, on disk beside the cache:
    after block i, the file probes-i holds the dense stream and the two of each block so far (the
    same bytes whether or not the run was interrupted: a resumed survey reads the last block's)."""

    def __init__(self, ctx: RunContext):
        self.ctx, arch = ctx, ctx.model.arch
        self.windows, self.positions = probe_shape(len(ctx.share.windows), ctx.cfg.seq_len)
        self.files = ActivationCache(ctx.cache.folder, stream_count(arch.n_layers) * self.windows,
                                     self.positions, arch.hidden, ctx.cache.dtype)
        stream_bytes = self.files.itemsize * self.windows * self.positions * arch.hidden
        self.group = max(1, STREAM_GROUP_BYTES // stream_bytes)  # streams in memory at once

    def read(self, layer: int, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Streams [lo, hi) after block `layer` (layer -1: the dense stream of block 0's inputs)."""
        w, ctx = self.windows, self.ctx
        if layer < 0:
            return ctx.cache.batch(0, 0, w, ctx.device, dtype)[None, :, :self.positions]
        rows = self.files.batch(layer, lo * w, hi * w, ctx.device, dtype, kind="probes")
        return rows.reshape(hi - lo, w, *rows.shape[1:])

    def step(self, layer: int, W, cuts: dict, dtype: torch.dtype) -> dict:
        """Block `layer`'s part: every stream through it, its two probes started; the probes'
        local costs ("probe"), and after the last block every probe's KL at the output ("sensitivity")."""
        ctx, spec = self.ctx, self.ctx.model.arch.blocks[layer]
        cos, sin = ctx.cos[:self.positions], ctx.sin[:self.positions]
        n_in = 1 + len(KINDS) * layer
        writer = self.files.writer(layer, "probes")
        for lo in range(0, n_in, self.group):
            hi = min(lo + self.group, n_in)
            before = self.read(layer - 1, lo, hi, dtype)
            after = through(W, spec, before, cos, sin)
            writer.write(lo * self.windows, after.flatten(0, 1))
            if lo == 0:
                dense_in, dense_out = before[0], after[0]
        probes, local = start_probes(W, cuts, spec, dense_in, dense_out, cos, sin)
        writer.write(n_in * self.windows, probes.flatten(0, 1))
        writer.commit()
        measured = {"probe": local}
        if layer == ctx.model.arch.n_layers - 1:
            measured["sensitivity"] = self.divergences(layer, n_in + len(KINDS), dtype)
        return measured

    def divergences(self, layer: int, count: int, dtype: torch.dtype) -> list[list[float]]:
        """Per block, (heads, mlp): KL of its probes' next-token distributions from the dense one's
        after the last block, over the dense model's top tokens."""
        ctx, arch, index = self.ctx, self.ctx.model.arch, self.ctx.model.index
        head = arch.head_tensor
        norm = index.load({"n": FINAL_NORM}, ctx.device, dtype)["n"]
        eps = arch.blocks[-1].eps
        dense = final_states(self.read(layer, 0, 1, dtype), norm, eps)[0]  # (N, E)
        chunk = max(1, STREAM_GROUP_BYTES // (4 * max(arch.hidden, dense.shape[0])))
        ids = top_tokens(dense, lambda lo, hi: index.rows(head, torch.arange(lo, hi)).to(ctx.device), arch.vocab,
                         chunk)
        union = ids.unique()
        where = torch.searchsorted(union, ids)
        rows = index.rows(head, union.cpu()).to(ctx.device)
        target = top_logits(dense, rows, where)
        kl = []
        for lo in range(1, count, self.group):
            states = final_states(self.read(layer, lo, min(lo + self.group, count), dtype), norm, eps)
            kl += [top_kl(target, top_logits(s, rows, where)) for s in states]
        return [kl[i:i + len(KINDS)] for i in range(0, len(kl), len(KINDS))]

    def drop(self, layer: int) -> None:
        if layer >= 0:
            self.files.path(layer, "probes").unlink(missing_ok=True)


@dataclass(frozen=True)
class SurveyOnly:
    """What `run --survey-only` gives: every block's costs, its shape at each previewed sparsity
    (--sparsity and --preview), and the blocks as they are."""

    costs: list[BlockCosts]
    previews: tuple[Preview, ...]
    input_blocks: tuple[BlockShape, ...]


def survey_previews(cfg: RunConfig, arch: Architecture, costs: list[BlockCosts]) -> SurveyOnly:
    """preview() at each of cfg.previewed, by cfg's allocation and alignment (each sparsity checked
    before the survey: checked.check_run)."""
    previews = tuple(preview(arch.blocks, costs, sparsity, allocate(cfg.allocation, arch.blocks, costs, sparsity,
                                                                     cfg.alignment)) for sparsity in cfg.previewed)
    return SurveyOnly(costs, previews, tuple(BlockShape.of(b) for b in arch.blocks))
