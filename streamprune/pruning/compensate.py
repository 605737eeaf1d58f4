"""Weight compensation: after slicing, adjust the kept weights so the pruned block reproduces the
dense block on the calibration tokens. Each method is a `Compensation` in COMPENSATIONS (lsq,
mean, none); the loop calls `apply` and never branches on the method.

lsq refits the block's output projections by least squares (each token's error weighed
relative to its size, as the next block's RMSNorm sees it).

o_proj is refit so the kept heads reproduce the dense attention output; then down_proj is refit
so the kept neurons, fed by the already-compensated attention, reproduce the dense block output
(the MLP absorbs what attention could not). Each is ridge regression towards the sliced original
weights, W = (G + lam I)^-1 (C + lam W0) with G = A^T A and C = A^T Y accumulated in fp64 over
micro-batches; lam is `ridge` times the mean of diag(G). A sublayer that lost no unit is left
alone, so a 0% prune stays the exact identity."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..arch.spec import BlockSpec
from .block import attention_heads, attention_output, mlp_activations, rms_norm
from .numerics import NormalEquations, gram_dtype, token_scale
from .phases import phase
from .ranks import SINGLE, Ranks
from .scoring.base import Calibration
from .scoring.obs import down_equations
from .selection import Kept


def memory_bytes(n_in: int, n_out: int) -> int:
    """Peak bytes of one refit with n_in kept input channels: G and C, and beside them either one
    micro-batch's product (fp32, and its fp64 copy up to FP64_SOLVE_MAX) or the Cholesky factor."""
    item = 8 if gram_dtype(n_in) == torch.float64 else 4
    product = (12 if item == 8 else 4) * n_in * max(n_in, n_out)
    return item * n_in * (n_in + n_out) + max(product, item * n_in * n_in)


def work_bytes(spec: BlockSpec, spec_new: BlockSpec) -> int:
    """Peak memory of compensating a block cut to spec_new (the larger of the two refits)."""
    return max(memory_bytes(spec_new.n_heads * spec_new.head_dim, spec.hidden),
               memory_bytes(spec_new.intermediate, spec.hidden))


def compensate(W: dict[str, torch.Tensor], spec: BlockSpec, W_new: dict[str, torch.Tensor], spec_new: BlockSpec,
               kept: Kept, calib: Calibration) -> dict[str, torch.Tensor]:
    """W_new with o_proj and down_proj refit (with the block's ridges, calib.ridges); W (dense) gives
    the targets. What the scorer already measured behind the same heads (calib.shared: the refit
    o_proj, down_proj's equations over all neurons) is used instead of a pass; the dense outputs
    are read back when kept."""
    W_new = dict(W_new)
    heads_removed = spec_new.n_heads < spec.n_heads
    if heads_removed:
        o_proj = shared(calib, "attention", kept)
        W_new["o"] = o_proj if o_proj is not None else refit_o_proj(W, spec, W_new, kept, calib, calib.ridges.heads)
    if heads_removed or spec_new.intermediate < spec.intermediate:
        eq = shared(calib, "mlp", kept)
        if eq is not None:  # over all neurons
            eq = eq.restricted(kept.neurons)
        else:
            with phase(calib.timer, "compensation_gram"):
                eq = down_equations(W, spec, calib, kept.heads, W_new["o"], kept.neurons)
        with phase(calib.timer, "compensation_solve"):
            W_new["down"] = eq.solve(W_new["down"], calib.ridges.neurons)
    return W_new


def shared(calib: Calibration, what: str, kept: Kept):
    """What the scorer left in calib.shared[what], if it was measured behind the kept heads (else None)."""
    heads, value = calib.shared.get(what, (None, None))
    return value if heads is not None and torch.equal(heads.cpu(), kept.heads.cpu()) else None


def refit_o_proj(W, spec: BlockSpec, W_new, kept: Kept, calib: Calibration, ridge: float) -> torch.Tensor:
    """o_proj refit so the kept heads reproduce the dense attention output (one attention pass)."""
    eq = NormalEquations(calib.placement, calib.ranks)
    with phase(calib.timer, "compensation_gram"):
        for x in calib.batches():
            heads = attention_heads(W, spec, x, calib.cos, calib.sin)
            target = attention_output(W, heads) - W.get("o_bias", 0)
            eq.add(heads[:, :, kept.heads.to(x.device)].flatten(-2), target, token_scale(x + target))
    with phase(calib.timer, "compensation_solve"):
        return eq.solve(W_new["o"], ridge)


def restore_means(W: dict[str, torch.Tensor], spec: BlockSpec, W_new: dict[str, torch.Tensor], kept: Kept,
                  batches: Callable[[], Iterator[torch.Tensor]], cos, sin, biases: frozenset[str],
                  ranks: Ranks = SINGLE) -> dict[str, torch.Tensor]:
    """FLAP's compensation (An et al., arXiv 2312.11983): what the removed heads and neurons output
    on average over the calibration tokens (dense block) is added to o_proj's and down_proj's
    bias, for the sublayers in `biases` (those whose output can carry a bias)."""
    W_new, n = dict(W_new), 0
    head_sum = act_sum = 0
    for x in batches():
        heads = attention_heads(W, spec, x, cos, sin)
        a = mlp_activations(W, rms_norm(x + attention_output(W, heads), W["mlp_norm"], spec.eps))
        head_sum = head_sum + heads.double().sum((0, 1))  # (H, D)
        act_sum = act_sum + a.double().sum((0, 1))  # (I,)
        n += x.shape[0] * x.shape[1]
    head_sum, act_sum = ranks.sum_(head_sum), ranks.sum_(act_sum)  # the other ranks' windows
    n = round(ranks.sum_(torch.tensor([float(n)], dtype=torch.float64)).item())
    for sublayer, proj, bias, total, kept_units in (("attention", "o", "o_bias", head_sum, kept.heads),
                                                    ("mlp", "down", "down_bias", act_sum, kept.neurons)):
        removed = torch.ones(total.shape[0], dtype=torch.float64, device=W[proj].device)
        removed[kept_units.to(removed.device)] = 0
        if sublayer not in biases or not removed.any():
            continue
        mean = (total / n * (removed[:, None] if total.dim() == 2 else removed)).flatten()
        shift = W[proj].double() @ mean
        W_new[bias] = (W[bias].double() + shift if bias in W else shift).to(W[proj].dtype)
    return W_new


class Compensation:
    """How a sliced block's kept weights are adjusted; the default does nothing."""

    name = "none"
    refits = False  # output projections are refit by least squares (a unit costs what the rest cannot make up)
    needs_biases = False  # the output gets bias slots for the sublayers that lose units
    forward_passes = 0.0  # block forwards over all calibration tokens (for time estimates)

    def apply(self, W: dict[str, torch.Tensor], spec: BlockSpec, W_new: dict[str, torch.Tensor],
              spec_new: BlockSpec, kept: Kept, calib: Calibration, biases: frozenset[str]) -> dict[str, torch.Tensor]:
        """W_new adjusted; W (dense) gives the targets; `biases`: sublayers with an output bias."""
        return W_new

    def work_bytes(self, spec: BlockSpec, spec_new: BlockSpec) -> int:
        """Memory held beside the weights and a micro-batch (for the memory plan)."""
        return 0


class LeastSquares(Compensation):
    name, refits, forward_passes = "lsq", True, 2.0  # o_proj's pass (attention), down_proj's (a block and its Gram)

    def apply(self, W, spec, W_new, spec_new, kept, calib, biases):
        return compensate(W, spec, W_new, spec_new, kept, calib)

    def work_bytes(self, spec, spec_new):
        return work_bytes(spec, spec_new)


class MeanBias(Compensation):
    name, needs_biases, forward_passes = "mean", True, 1.0

    def apply(self, W, spec, W_new, spec_new, kept, calib, biases):
        return restore_means(W, spec, W_new, kept, calib.batches, calib.cos, calib.sin, biases, calib.ranks)


COMPENSATIONS: dict[str, Compensation] = {c.name: c() for c in (LeastSquares, MeanBias, Compensation)}
