"""Statistics of the inputs of o_proj (head outputs) and down_proj (SwiGLU activations) over a
block's calibration tokens, from one dense pass: what activation-aware metrics need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...arch.spec import BlockSpec
from ..block import attention_heads, attention_output, mlp_activations, rms_norm
from .base import Calibration


@dataclass(frozen=True)
class ChannelStats:
    """Per input channel of o_proj (H*D) and down_proj (I): token count, sum, sum of squares (fp64)."""

    tokens: int
    head_sum: torch.Tensor
    head_sumsq: torch.Tensor
    neuron_sum: torch.Tensor
    neuron_sumsq: torch.Tensor

    @property
    def head_mean(self) -> torch.Tensor:
        return self.head_sum / self.tokens

    @property
    def neuron_mean(self) -> torch.Tensor:
        return self.neuron_sum / self.tokens

    @property
    def head_var(self) -> torch.Tensor:
        return (self.head_sumsq / self.tokens - self.head_mean ** 2).clamp_min(0)

    @property
    def neuron_var(self) -> torch.Tensor:
        return (self.neuron_sumsq / self.tokens - self.neuron_mean ** 2).clamp_min(0)


def channel_stats(W: dict[str, torch.Tensor], spec: BlockSpec, calib: Calibration) -> ChannelStats:
    tokens = 0
    sums = [torch.zeros(n, dtype=torch.float64) for n in (spec.n_heads * spec.head_dim,) * 2 + (spec.intermediate,) * 2]
    for x in calib.batches():
        heads = attention_heads(W, spec, x, calib.cos, calib.sin)
        h = x + attention_output(W, heads)
        a = mlp_activations(W, rms_norm(h, W["mlp_norm"], spec.eps))
        o = heads.flatten(-2).flatten(0, 1).double()
        a = a.flatten(0, 1).double()
        tokens += o.shape[0]
        for acc, part in zip(sums, (o.sum(0), o.pow(2).sum(0), a.sum(0), a.pow(2).sum(0))):
            acc += part.cpu()
    for acc in sums:  # the other ranks' windows
        calib.ranks.sum_(acc)
    return ChannelStats(int(calib.ranks.sum_float(tokens)), *sums)


def per_head(channel_scores: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    """Sum channel scores over each head's head_dim channels: (H*D,) -> (H,)."""
    return channel_scores.view(spec.n_heads, spec.head_dim).sum(1)
