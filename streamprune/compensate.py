"""Weight compensation: after slicing, refit the block's output projections by least squares so
the pruned block reproduces the dense block's output on the calibration tokens.

o_proj is refit so the kept heads reproduce the dense attention output; then down_proj is refit
so the kept neurons, fed by the already-compensated attention, reproduce the dense block output
(the MLP absorbs what attention could not). Each is ridge regression towards the sliced original
weights, W = (G + lam I)^-1 (C + lam W0) with G = A^T A and C = A^T Y accumulated in fp64 over
micro-batches; lam is `ridge` times the mean of diag(G). A sublayer that lost no unit is left
alone, so a 0% prune stays the exact identity."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .block import attention_heads, attention_output, mlp_activations, rms_norm
from .families import BlockSpec
from .selection import Kept

RIDGE = 1e-2


class NormalEquations:
    """Streaming accumulation of G = A^T A and C = A^T Y (fp64) and the ridge solve."""

    def __init__(self):
        self.G = self.C = None

    def add(self, A: torch.Tensor, Y: torch.Tensor) -> None:
        A, Y = A.reshape(-1, A.shape[-1]).float(), Y.reshape(-1, Y.shape[-1]).float()
        G, C = (A.T @ A).double(), (A.T @ Y).double()
        self.G = G if self.G is None else self.G + G
        self.C = C if self.C is None else self.C + C

    def solve(self, W0: torch.Tensor, ridge: float) -> torch.Tensor:
        """The (out, in) weight minimising |A W^T - Y|^2 + lam |W - W0|^2."""
        lam = ridge * self.G.diagonal().mean().clamp_min(1e-12)
        G = self.G + lam * torch.eye(self.G.shape[0], dtype=self.G.dtype, device=self.G.device)
        rhs = self.C + lam * W0.T.double()
        L, info = torch.linalg.cholesky_ex(G)
        Wt = torch.cholesky_solve(rhs, L) if info.item() == 0 else torch.linalg.lstsq(G, rhs).solution
        return Wt.T.to(W0.dtype).contiguous()


def compensate(W: dict[str, torch.Tensor], spec: BlockSpec, W_new: dict[str, torch.Tensor], spec_new: BlockSpec,
               kept: Kept, batches: Callable[[], Iterator[torch.Tensor]], cos, sin,
               ridge: float | None = None) -> dict[str, torch.Tensor]:
    """W_new with o_proj and down_proj refit; W (dense) gives the targets."""
    W_new, ridge = dict(W_new), RIDGE if ridge is None else ridge
    heads_removed = spec_new.n_heads < spec.n_heads
    if heads_removed:
        eq = NormalEquations()
        for x in batches():
            heads = attention_heads(W, spec, x, cos, sin)
            target = attention_output(W, heads) - (W["o_bias"] if "o_bias" in W else 0)
            eq.add(heads[:, :, kept.heads.to(x.device)].flatten(-2), target)
        W_new["o"] = eq.solve(W_new["o"], ridge)
    if heads_removed or spec_new.intermediate < spec.intermediate:
        eq = NormalEquations()
        for x in batches():
            h_dense = x + attention_output(W, attention_heads(W, spec, x, cos, sin))
            y_dense = h_dense + F.linear(mlp_activations(W, rms_norm(h_dense, W["mlp_norm"], spec.eps)),
                                         W["down"], W.get("down_bias"))
            h = x + attention_output(W_new, attention_heads(W_new, spec_new, x, cos, sin))
            a = mlp_activations(W_new, rms_norm(h, W_new["mlp_norm"], spec.eps))
            eq.add(a, y_dense - h - (W["down_bias"] if "down_bias" in W else 0))
        W_new["down"] = eq.solve(W_new["down"], ridge)
    return W_new
