"""Compensation-aware neuron selection: Optimal Brain Surgeon on down_proj, one block at a time.

Least-squares compensation (compensate.py) refits down_proj on the kept neurons. So a neuron's
true cost is not what its output contributes but what the *other* neurons cannot make up for
once refit. For a linear layer with input Gram matrix G = A^T A (A: the neurons' activations on
the calibration tokens) and weight W, removing neuron j and refitting the rest optimally
costs |W[:, j]|^2 / [G^-1]_jj (Hassibi & Stork's OBS, applied to whole input channels as in
SlimGPT and ZipLM). Greedily: remove the cheapest neurons, update W and G^-1 as OBS does
(the kept weights absorb the removed ones), and repeat. The greedy runs in `chunks` steps, so
its cost is about 2 I^2 x (neurons removed) multiply-adds plus one I x I factorization.

Forward passes only: G comes from the block's activations behind the already chosen heads, o_proj
refit, with tokens weighted as compensation weighs them; the same pass gives compensation's
equations (down_equations), so the neurons are chosen on the Gram their refit then uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...arch.spec import BlockSpec
from ..block import attention_heads, attention_output, mlp_activations, rms_norm
from ..numerics import RIDGE, NormalEquations, add_ridge, gram_dtype, invert_spd, solve, token_scale
from ..phases import phase
from .base import Calibration

CHUNKS = 32  # greedy steps
COMPACT = 0.75  # the greedy's matrices shrink to the remaining neurons when fewer than this fraction remain


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj's input columns of the query heads listed (head_dim each)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def refit_attention(G: torch.Tensor, W_o: torch.Tensor, spec: BlockSpec, kept_heads: torch.Tensor,
                    ridge: float = RIDGE) -> torch.Tensor:
    """o_proj (E, kept heads x D) refit so the kept heads reproduce the dense attention output,
    from G (H*D, H*D), the token-weighted Gram of all head outputs: the target is o_proj of all
    heads, so A_K^T Y = G[K, :] o_proj^T needs no pass of its own (compensate.py's o refit)."""
    cols = head_columns(kept_heads.to(G.device), spec.head_dim)
    C = G[cols] @ W_o.T.to(G.device, G.dtype)
    return NormalEquations.of(G[cols][:, cols], C).solve(W_o[:, cols.to(W_o.device)], ridge)


def down_equations(W, spec: BlockSpec, calib: Calibration, kept_heads: torch.Tensor | None = None,
                   o_proj: torch.Tensor | None = None, neurons: torch.Tensor | None = None,
                   rhs: bool = True) -> NormalEquations:
    """down_proj's normal equations over all neurons (or those listed in `neurons`), behind the
    attention cut to `kept_heads` with `o_proj` (None: the dense attention): A = the MLP
    activations, Y = what down_proj must add for the block to reproduce its dense output, tokens
    weighted by 1 / rms of that output. G is what greedy OBS ranks the neurons on; restricted to the
    kept neurons, G and C are least-squares compensation's refit of down_proj. One pass; the dense
    outputs are read back when kept. `rhs` False: G alone (OBS's ranking)."""
    eq = NormalEquations(calib.placement, calib.ranks)
    bias = W.get("down_bias", 0)
    W_in = W if neurons is None else {k: W[k][neurons.to(W[k].device)] for k in ("gate", "up", "gate_bias", "up_bias")
                                      if k in W}

    def dense(x):  # the dense block, its residual and MLP activations kept for an uncut attention
        h = x + attention_output(W, attention_heads(W, spec, x, calib.cos, calib.sin))
        a = mlp_activations(W, rms_norm(h, W["mlp_norm"], spec.eps))
        return h + F.linear(a, W["down"], W.get("down_bias")), (h, a)

    assert kept_heads is not None or neurons is None, "a neuron subset needs the attention it sits behind"
    # (h, a) of every micro-batch, for the output pass; not of an OBS ranking pass (`rhs` False): the
    # refit o_proj that follows it is compensation's pass, whose (h, a) the output pass takes
    kept = calib.mlp if rhs else None
    if kept is not None:
        kept.start(kept_heads, o_proj, neurons)
    for x, y, dense_mlp in calib.with_targets(dense):
        if kept_heads is not None:
            heads = attention_heads(W, spec, x, calib.cos, calib.sin)[:, :, kept_heads.to(x.device)]
            h = x + F.linear(heads.flatten(-2), o_proj, W.get("o_bias"))
            a = mlp_activations(W_in, rms_norm(h, W["mlp_norm"], spec.eps))
            eq.add(a, y - h - bias if rhs else None, token_scale(y))
        else:
            if dense_mlp is None:  # (dense outputs read back: the activations once more)
                h = x + attention_output(W, attention_heads(W, spec, x, calib.cos, calib.sin))
                a = mlp_activations(W, rms_norm(h, W["mlp_norm"], spec.eps))
            else:
                h, a = dense_mlp
            eq.add(a, None, token_scale(y))
        if kept is not None:
            kept.add(h, a)
    if kept is not None:
        kept.done()
    eq.summed()
    if kept_heads is None and rhs:  # the dense attention: down_proj's own output is the target, C = G W^T
        eq.C = eq.G @ W["down"].T.to(eq.G.device, eq.G.dtype)
    return eq


def greedy_removal_scores(G: torch.Tensor, W_down: torch.Tensor, n_remove: int, chunks: int = CHUNKS,
                          ridge: float = RIDGE, curve: list | None = None, timer=None,
                          held_out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (I,) from greedy OBS: removed neurons score their removal step (earliest = least
    important), kept ones score above all of them. G: (I, I) Gram (ridge added in place); W_down:
    (E, I). `curve`, if given, receives (neurons removed, total cost) after each step: the
    weighted squared output error of the removal once the rest are refit, on the tokens G sums
    over, or (`held_out`: the weighted activations (n, I) of other tokens) on those tokens.

    The inverse Gram and the weights shrink to the remaining neurons whenever a quarter of them
    are gone (COMPACT), so a step costs about 2 k r^2 multiply-adds for r remaining, not 2 k I^2:
    removing most neurons costs about half of updating the full I x I inverse every step, and
    the copies stay few (a gather costs far more per entry than the update on a CPU)."""
    I = G.shape[0]
    with phase(timer, "obs_factor"):
        add_ridge(G, ridge)
        Hinv = invert_spd(G)
    with phase(timer, "obs_greedy"):
        W = W_down.to(Hinv.device, Hinv.dtype).clone()
        left = torch.arange(I, device=Hinv.device)  # the original index of each row of Hinv
        alive = torch.ones(I, dtype=torch.bool, device=Hinv.device)
        scores = torch.empty(I, dtype=torch.float64, device=Hinv.device)
        if held_out is not None:
            held_out = held_out.to(W.device, W.dtype)
            target = held_out @ W.T  # (n, E): what the dense down_proj outputs on the held-out tokens
        done, step, n_alive = 0, max(1, -(-n_remove // chunks)), I
        while done < n_remove:
            k = min(step, n_remove - done)
            cost = W.pow(2).sum(0) / Hinv.diagonal().clamp_min(1e-30)
            cost[~alive] = float("inf")
            R = cost.argsort()[:k]  # rows of Hinv
            Hinv_RR = Hinv[R][:, R]
            M = solve(Hinv_RR, Hinv[R, :])  # (k, r)
            if curve is not None and held_out is None:  # the chunk's joint OBS cost, W_R Hinv_RR^-1 W_R^T
                total = (curve[-1][1] if curve else 0.0) + (W[:, R].T * solve(Hinv_RR, W[:, R].T)).sum().item()
                curve.append((done + k, total))
            W.addmm_(W[:, R], M, alpha=-1)  # the kept weights absorb the removed neurons (OBS update)
            Hinv.addmm_(Hinv[:, R], M, alpha=-1)  # the inverse Gram of the neurons that remain
            alive[R] = False
            if curve is not None and held_out is not None:  # the refit's error on the held-out tokens
                kept = alive.nonzero().flatten()
                curve.append((done + k, (held_out[:, left[kept]] @ W[:, kept].T - target).pow(2).sum().item()))
            scores[left[R]] = torch.arange(done, done + k, dtype=torch.float64, device=scores.device)
            done, n_alive = done + k, n_alive - k
            if n_alive < COMPACT * len(left) and done < n_remove:
                keep = alive.nonzero().flatten()
                Hinv, W, left = Hinv.index_select(0, keep).index_select(1, keep), W[:, keep], left[keep]
                alive = torch.ones(len(keep), dtype=torch.bool, device=Hinv.device)
        if alive.any():
            cost = (W.pow(2).sum(0) / Hinv.diagonal().clamp_min(1e-30)).double()[alive]
            scores[left[alive]] = n_remove + 1 + cost / cost.max().clamp_min(1e-30)
    return scores.cpu()


def memory_bytes(spec: BlockSpec) -> int:
    """Peak bytes: three I x I matrices (the caller's Gram matrix, which stays alive, beside the
    Cholesky factor and the inverse while it is computed, then beside the inverse and its
    compacted copy after the first step) and four of down_proj's size (compensation's C, kept
    beside G, the updated weights, their squares, the compacted copy)."""
    item = 8 if gram_dtype(spec.intermediate) == torch.float64 else 4
    return 3 * item * spec.intermediate ** 2 + 4 * item * spec.hidden * spec.intermediate
