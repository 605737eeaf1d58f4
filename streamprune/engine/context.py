"""The run context: what every stage of a run shares (survey, pruning pass, report), built once
when the journal has pinned the micro-batch and where the Gram matrices live, and frozen."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.families import rotary_tables
from ..arch.model import Model, block_generator
from ..config import RunConfig
from ..device import check_device
from ..pruning.numerics import GramPlacement, Ridges
from ..pruning.phases import PhaseTimer, timed_batches
from ..pruning.ranks import Ranks
from ..pruning.scoring import Calibration
from ..pruning.scoring.base import KeptMlp, Targets
from ..pruning.shape import Shape
from ..store.cache import ActivationCache
from .distributed import Share, window_share
from .stream import BlockStream


@dataclass(frozen=True)
class RunContext:
    cfg: RunConfig
    model: Model
    cache: ActivationCache  # this rank's: the inputs of its `share` of the windows
    tokens: torch.Tensor  # (windows of this rank, seq_len) calibration token ids
    batch: int  # windows per micro-batch, pinned by the journal (float sums depend on it)
    placement: GramPlacement  # where the large Gram matrices live (the memory plan's choice, pinned)
    ranks: Ranks
    share: Share
    rule: Shape | None  # the fixed rule's shape (a model of blocks of one shape), else None
    device: torch.device
    cos: torch.Tensor  # (seq_len, head_dim) rotary tables on `device`
    sin: torch.Tensor
    resident: bool = False  # a block's inputs and dense outputs stay on the device between passes (the plan's call)
    keep_mlp: bool = False  # the last MLP pass's residual and activations are kept for the output pass (pinned)

    @classmethod
    def build(cls, cfg: RunConfig, model: Model, cache: ActivationCache, tokens: torch.Tensor, batch: int,
              placement: GramPlacement, ranks: Ranks, rule: Shape | None, resident: bool = False,
              keep_mlp: bool = False) -> "RunContext":
        """`tokens`: every window's; the context keeps this rank's."""
        share, device = window_share(ranks, cfg.samples, batch), check_device(cfg.device)
        cos, sin = rotary_tables(model.arch.config, cfg.seq_len, device)
        return cls(cfg, model, cache, tokens[share.windows.start:share.windows.stop], batch, placement, ranks, share,
                   rule, device, cos, sin, resident, keep_mlp)

    def stream(self) -> BlockStream:
        """A walk over the blocks on this rank's cached windows."""
        return BlockStream(self.model, self.cache, self.device, self.batch, len(self.share.windows), self.resident)

    def calibration(self, stream: BlockStream, layer: int, dtype: torch.dtype, timer: PhaseTimer | None,
                    targets: Targets | None = None, ridges: Ridges = Ridges(), mlp: KeptMlp | None = None
                    ) -> Calibration:
        """Block `layer`'s calibration inputs as the math sees them: this rank's micro-batches (the
        time to read each counted as cache_read), the rotary tables, the block's random stream, and
        how the windows are split among the ranks; the ridges of its refits; where the last MLP pass
        keeps what it saw (`mlp`)."""
        return Calibration(lambda: timed_batches((x for _, x in stream.batches(layer, dtype)), timer), self.cos,
                           self.sin, block_generator(self.cfg.seed, layer), self.cfg.samples, timer, self.placement,
                           self.ranks, self.share.batch_sizes, self.share.local, targets, ridges, mlp=mlp)
