"""Compensation-aware neuron selection: Optimal Brain Surgeon on down_proj, one block at a time.

Least-squares compensation (compensate.py) refits down_proj on the kept neurons. So a neuron's
true cost is not what its output contributes but what the *other* neurons cannot make up for
once refit. For a linear layer with input Gram matrix G = A^T A (A: the neurons' activations on
the calibration tokens) and weight W, removing neuron j and refitting the rest optimally
costs |W[:, j]|^2 / [G^-1]_jj (Hassibi & Stork's OBS, applied to whole input channels as in
SlimGPT and ZipLM). Greedily: remove the cheapest neurons, update W and G^-1 as OBS does
(the kept weights absorb the removed ones), and repeat. The greedy runs in `chunks` steps, so
its cost is about 2 I^2 x (neurons removed) multiply-adds plus one I x I factorization.

Forward passes only: G comes from the block's activations behind the already chosen heads, with
tokens weighted as compensation weighs them."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..block import attention_heads, attention_output, mlp_activations, mlp_output, rms_norm
from ..families import BlockSpec
from ..numerics import (ON_DEVICE, RIDGE, GramPlacement, add_gram, add_ridge, gram_dtype, invert_spd, solve,
                        token_scale)
from ..phases import phase

CHUNKS = 32  # greedy steps
COMPACT = 0.75  # the greedy's matrices shrink to the remaining neurons when fewer than this fraction remain


def activation_gram(W, spec: BlockSpec, head_keep: torch.Tensor, batches: Callable[[], Iterator[torch.Tensor]],
                    cos, sin, placement: GramPlacement = ON_DEVICE,
                    sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """G = sum_t w_t a_t a_t^T over the calibration tokens, a_t the MLP activations behind the
    heads in `head_keep` (H,) and w_t = 1 / mean(y_t^2) of the dense block output. Large Gram
    matrices are kept in fp32, as compensation keeps its factors. `sum_` adds the other ranks' parts."""
    G = None
    for x in batches():
        heads = attention_heads(W, spec, x, cos, sin)  # once: the dense and the cut block share it
        h_dense = x + attention_output(W, heads)
        y = h_dense + mlp_output(W, spec, h_dense)
        h = x + attention_output(W, heads, head_keep.to(x.device))
        a = mlp_activations(W, rms_norm(h, W["mlp_norm"], spec.eps)).reshape(-1, spec.intermediate).float()
        a = a * token_scale(y).reshape(-1, 1)
        G = add_gram(G, a, placement=placement)
    return sum_(G)


def greedy_removal_scores(G: torch.Tensor, W_down: torch.Tensor, n_remove: int, chunks: int = CHUNKS,
                          ridge: float = RIDGE, curve: list | None = None, timer=None) -> torch.Tensor:
    """Scores (I,) from greedy OBS: removed neurons score their removal step (earliest = least
    important), kept ones score above all of them. G: (I, I) Gram (ridge added in place); W_down:
    (E, I). `curve`, if given, receives (neurons removed, total cost) after each step: the
    weighted squared output error of the removal once the rest are refit.

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
        done, step, n_alive = 0, max(1, -(-n_remove // chunks)), I
        while done < n_remove:
            k = min(step, n_remove - done)
            cost = W.pow(2).sum(0) / Hinv.diagonal().clamp_min(1e-30)
            cost[~alive] = float("inf")
            R = cost.argsort()[:k]  # rows of Hinv
            Hinv_RR = Hinv[R][:, R]
            M = solve(Hinv_RR, Hinv[R, :])  # (k, r)
            if curve is not None:  # the chunk's joint OBS cost, W_R Hinv_RR^-1 W_R^T
                total = (curve[-1][1] if curve else 0.0) + (W[:, R].T * solve(Hinv_RR, W[:, R].T)).sum().item()
                curve.append((done + k, total))
            W.addmm_(W[:, R], M, alpha=-1)  # the kept weights absorb the removed neurons (OBS update)
            Hinv.addmm_(Hinv[:, R], M, alpha=-1)  # the inverse Gram of the neurons that remain
            alive[R] = False
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
    compacted copy after the first step) and three copies of down_proj's size (its updated
    weights, their squares, the compacted copy)."""
    item = 8 if gram_dtype(spec.intermediate) == torch.float64 else 4
    return 3 * item * spec.intermediate ** 2 + 3 * item * spec.hidden * spec.intermediate
