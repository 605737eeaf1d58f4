"""What `run --survey-only` shows: from the survey's measured costs, the shape the allocation gives
every block at a sparsity, and the cost it predicts (the sum of the blocks' costs: their relative
output errors, as the allocation adds them). Pure functions of (blocks, costs, sizes); nothing is
pruned."""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.spec import BlockSpec
from .allocation import linear_params
from .costs import BlockCosts
from .selection import Sizes


@dataclass(frozen=True)
class BlockShape:
    """One block's query heads, KV heads and neurons, and the measured cost of cutting it to them."""

    heads: int
    kv_heads: int
    neurons: int
    cost: float = 0.0

    @classmethod
    def of(cls, spec: BlockSpec) -> "BlockShape":
        """A block as it is (nothing cut: cost 0)."""
        return cls(spec.n_heads, spec.n_kv, spec.intermediate)


@dataclass(frozen=True)
class Preview:
    """Every block's shape at one sparsity (None: the block dropped), with the linear weights before
    and after, the fraction removed and the predicted cost."""

    sparsity: float
    linear_params_before: int
    linear_params_after: int
    removed_fraction: float
    predicted_cost: float
    blocks: tuple[BlockShape | None, ...]


def block_cost(c: BlockCosts, s: Sizes | None) -> float:
    """The measured cost of cutting a block to `s` (None: dropping it)."""
    return c.drop if s is None else c.heads.get((s.n_kv, s.group), 0.0) + c.mlp(s.intermediate)


def preview(blocks: tuple[BlockSpec, ...], costs: list[BlockCosts], sparsity: float,
            sizes: list[Sizes | None]) -> Preview:
    full = [linear_params(b, Sizes(b.n_kv, b.group, b.intermediate)) for b in blocks]
    kept = [linear_params(b, s) for b, s in zip(blocks, sizes)]
    return Preview(sparsity, sum(full), sum(kept), 1 - sum(kept) / sum(full),
                   sum(block_cost(c, s) for c, s in zip(costs, sizes)),
                   tuple(None if s is None else BlockShape(s.n_heads, s.n_kv, s.intermediate, block_cost(c, s))
                         for c, s in zip(costs, sizes)))
