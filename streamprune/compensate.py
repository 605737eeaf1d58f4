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

from .block import attention_heads, attention_output, block_forward, mlp_activations, rms_norm
from .families import BlockSpec
from .scoring.base import Calibration
from .numerics import ON_DEVICE, RIDGE, GramPlacement, add_gram, add_ridge, gram_dtype, solve_spd, token_scale
from .selection import Kept
from .phases import phase


class NormalEquations:
    """Streaming accumulation of G = A^T A and C = A^T Y and the ridge solve: in fp64 up to
    FP64_SOLVE_MAX inputs, in fp32 beyond, where the solve is fp32 anyway (as OBS keeps its Gram)."""

    def __init__(self, placement: GramPlacement = ON_DEVICE,
                 sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.G = self.C = None
        self.placement = placement
        self.sum_ = sum_  # adds the other ranks' parts (several processes)

    def add(self, A: torch.Tensor, Y: torch.Tensor, scale: torch.Tensor) -> None:
        """Rows of A and Y (tokens) weighted by `scale` (per token)."""
        s = scale.reshape(-1, 1).float()
        A, Y = A.reshape(-1, A.shape[-1]).float() * s, Y.reshape(-1, Y.shape[-1]).float() * s
        self.G = add_gram(self.G, A, placement=self.placement)  # (in gram_dtype of A's columns)
        self.C = add_gram(self.C, A, Y, placement=self.placement)

    def solve(self, W0: torch.Tensor, ridge: float) -> torch.Tensor:
        """The (out, in) weight minimising |A W^T - Y|^2 + lam |W - W0|^2. Large systems are
        factored in fp32 (the ridge keeps them well conditioned) to halve the memory."""
        G, self.G = self.sum_(self.G), None
        self.sum_(self.C)
        lam = add_ridge(G, ridge)
        rhs = self.C.add_(lam * W0.T.to(self.C.device, self.C.dtype))
        return solve_spd(G, rhs).T.to(W0.device, W0.dtype).contiguous()


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
               kept: Kept, batches: Callable[[], Iterator[torch.Tensor]], cos, sin,
               ridge: float | None = None, timer=None, placement: GramPlacement = ON_DEVICE,
               sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
    """W_new with o_proj and down_proj refit; W (dense) gives the targets; `sum_` adds the other
    ranks' parts of the normal equations."""
    W_new, ridge = dict(W_new), RIDGE if ridge is None else ridge
    heads_removed = spec_new.n_heads < spec.n_heads
    if heads_removed:
        eq = NormalEquations(placement, sum_)
        with phase(timer, "compensation_gram"):
            for x in batches():
                heads = attention_heads(W, spec, x, cos, sin)
                target = attention_output(W, heads) - W.get("o_bias", 0)
                eq.add(heads[:, :, kept.heads.to(x.device)].flatten(-2), target, token_scale(x + target))
        with phase(timer, "compensation_solve"):
            W_new["o"] = eq.solve(W_new["o"], ridge)
    if heads_removed or spec_new.intermediate < spec.intermediate:
        eq = NormalEquations(placement, sum_)
        with phase(timer, "compensation_gram"):
            for x in batches():
                y_dense = block_forward(W, spec, x, cos, sin)
                h = x + attention_output(W_new, attention_heads(W_new, spec_new, x, cos, sin))
                a = mlp_activations(W_new, rms_norm(h, W_new["mlp_norm"], spec.eps))
                eq.add(a, y_dense - h - W.get("down_bias", 0), token_scale(y_dense))
        with phase(timer, "compensation_solve"):
            W_new["down"] = eq.solve(W_new["down"], ridge)
    return W_new


def restore_means(W: dict[str, torch.Tensor], spec: BlockSpec, W_new: dict[str, torch.Tensor], kept: Kept,
                  batches: Callable[[], Iterator[torch.Tensor]], cos, sin, biases: frozenset[str],
                  sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
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
    head_sum, act_sum = sum_(head_sum), sum_(act_sum)  # the other ranks' windows
    n = round(sum_(torch.tensor([float(n)], dtype=torch.float64)).item())
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
    name, refits, forward_passes = "lsq", True, 3.0  # two passes, dense and pruned attention in each

    def apply(self, W, spec, W_new, spec_new, kept, calib, biases):
        return compensate(W, spec, W_new, spec_new, kept, calib.batches, calib.cos, calib.sin, timer=calib.timer,
                          placement=calib.placement, sum_=calib.ranks.sum_)

    def work_bytes(self, spec, spec_new):
        return work_bytes(spec, spec_new)


class MeanBias(Compensation):
    name, needs_biases, forward_passes = "mean", True, 1.0

    def apply(self, W, spec, W_new, spec_new, kept, calib, biases):
        return restore_means(W, spec, W_new, kept, calib.batches, calib.cos, calib.sin, biases, calib.ranks.sum_)


COMPENSATIONS: dict[str, Compensation] = {c.name: c() for c in (LeastSquares, MeanBias, Compensation)}
