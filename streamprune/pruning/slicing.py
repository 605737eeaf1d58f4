"""Kept units -> a smaller block: remove rows and columns of q/k/v/o and gate/up/down (and
their biases). The sliced block computes what the original computes with the other units
masked out."""

from __future__ import annotations

import dataclasses

import torch

from ..arch.spec import BlockSpec
from .selection import Kept

# which dimension of each tensor indexes heads (in units of head_dim), KV heads or neurons
HEAD_DIM0 = ("q", "q_bias")
KV_DIM0 = ("k", "v", "k_bias", "v_bias")
NEURON_DIM0 = ("gate", "up", "gate_bias", "up_bias")


def rows_of(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units of `size` rows each: (n,) -> (n * size,)."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def slice_block(W: dict[str, torch.Tensor], spec: BlockSpec, kept: Kept) -> tuple[dict[str, torch.Tensor], BlockSpec]:
    D = spec.head_dim
    head_rows, kv_rows = rows_of(kept.heads, D), rows_of(kept.kv, D)
    out = {}
    for name, t in W.items():
        if name in HEAD_DIM0:
            t = t.index_select(0, head_rows.to(t.device))
        elif name in KV_DIM0:
            t = t.index_select(0, kv_rows.to(t.device))
        elif name in NEURON_DIM0:
            t = t.index_select(0, kept.neurons.to(t.device))
        elif name == "o":
            t = t.index_select(1, head_rows.to(t.device))
        elif name == "down":
            t = t.index_select(1, kept.neurons.to(t.device))
        out[name] = t.contiguous()
    new_spec = dataclasses.replace(spec, n_heads=len(kept.heads), n_kv=len(kept.kv),
                                   intermediate=len(kept.neurons))
    return out, new_spec


def add_zero_biases(W: dict[str, torch.Tensor], spec: BlockSpec) -> dict[str, torch.Tensor]:
    """W with a zero bias wherever `spec` has one that W lacks: a bias slot added so that
    compensation can use o_proj's or down_proj's bias brings its siblings (q/k/v, gate/up)."""
    like = W["o"]
    return {**W, **{name: torch.zeros(shape, dtype=like.dtype, device=like.device)
                    for name, shape in spec.shapes().items() if name not in W}}
