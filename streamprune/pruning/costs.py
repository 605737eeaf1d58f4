"""What every cut of a block would cost, measured once per block on its dense calibration inputs,
in units comparable across blocks, for the allocation (allocation.py) to decide each block's shape.

The unit: the squared error a cut adds to the block's output relative to the residual stream
it lands in, mean over tokens of |dy_t|^2 / |y_t|^2. The next block reads the stream through an
RMSNorm, so an error of a given relative size disturbs it alike at any depth. (The scorers weigh
errors relative to the block's own update, which ranks units inside a block but is not comparable
across blocks: a block that barely changes the stream would look as fragile as one that rewrites it.)

With least-squares compensation (--compensate lsq) a cut costs what the kept units cannot make up
for once o_proj / down_proj are refit: Optimal Brain Surgeon (Hassibi & Stork) on o_proj's
inputs (the heads, D columns each) and on down_proj's (the neurons, greedily removed as obs.py
does). A head layout is measured at the block output on a sample of tokens, with o_proj refit,
so the MLP's reaction to the attention error counts (measured at the attention output alone,
the costs let the allocation strip block 0 to one head: docs/scoring.md). Without a refit, a cut
costs the output of the removed units. Dropping the whole block costs its update y - x. One
forward pass over the calibration inputs gives all of it: the weighted Gram matrices of the head
outputs and of the MLP activations, the token sample, and the update energy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..arch.spec import BlockSpec
from .block import attention_heads, attention_output, mlp_activations, mlp_output, rms_norm
from .numerics import ON_DEVICE, RIDGE, GramPlacement, add_gram, add_ridge, invert_spd, mean_square, solve, token_scale
from .phases import phase
from .ranks import Ranks
from .scoring.base import Calibration
from .scoring.obs import greedy_removal_scores
from .selection import Sizes, select_units

CURVE_STEPS = 48  # points of a block's neuron curve
SAMPLE_TOKENS = 2048  # calibration tokens the head layouts are measured on (the perturb scorer's default)
CURVE_KEEP = 1 / 16  # the curve runs down to this fraction of the neurons (then extrapolates)


@dataclass(frozen=True)
class BlockCosts:
    """heads[(kv groups kept, heads kept per group)] and neurons [(neurons kept, cost)], kept
    descending from all (cost 0); drop: the cost of removing the whole block."""

    heads: dict[tuple[int, int], float]
    neurons: list[tuple[int, float]]
    drop: float

    def as_json(self) -> dict:
        return {"heads": [[kv, g, c] for (kv, g), c in sorted(self.heads.items())],
                "neurons": [list(p) for p in self.neurons], "drop": self.drop}

    @classmethod
    def from_json(cls, d: dict) -> "BlockCosts":
        return cls({(int(kv), int(g)): float(c) for kv, g, c in d["heads"]},
                   [(int(n), float(c)) for n, c in d["neurons"]], float(d["drop"]))

    def mlp(self, n: float) -> float:
        """Cost of keeping n neurons: the curve, linear between its points and beyond its end."""
        pts = self.neurons
        if n >= pts[0][0]:
            return 0.0
        for (n0, c0), (n1, c1) in zip(pts, pts[1:]):
            if n >= n1:
                return c0 + (c1 - c0) * (n0 - n) / (n0 - n1)
        (n0, c0), (n1, c1) = pts[-2], pts[-1]
        return c1 + (c1 - c0) * (n1 - n) / max(n0 - n1, 1)


class Grams:
    """Token-weighted Gram matrices of one block's head outputs (H*D)^2 and MLP activations I^2,
    accumulated over micro-batches, with the update energy and the token count."""

    def __init__(self, spec: BlockSpec, generator: torch.Generator | None = None, per_window: int = 0,
                 placement: GramPlacement = ON_DEVICE):
        self.spec, self.placement = spec, placement
        self.heads = self.mlp = None
        self.update = 0.0
        self.tokens = 0
        self.generator, self.per_window = generator, per_window  # tokens of each window kept in `sample`
        self.sample: list[tuple[torch.Tensor, ...]] = []  # (x, head outputs, y) at those tokens

    def add(self, W, x: torch.Tensor, cos, sin, timer=None) -> torch.Tensor:
        """Accumulate the batch x (B, T, E); returns the dense block output (B, T, E). The forward
        is timed as `dense_forward` (what a plain dense pass costs), the rest as `survey_gram`."""
        spec = self.spec
        with phase(timer, "dense_forward"):
            heads = attention_heads(W, spec, x, cos, sin)  # (B, T, H, D)
            h = x + attention_output(W, heads)
            a = mlp_activations(W, rms_norm(h, W["mlp_norm"], spec.eps))  # (B, T, I)
            y = h + F.linear(a, W["down"], W.get("down_bias"))
        s = token_scale(y).reshape(-1, 1)  # (N, 1): 1 / rms of each output token
        o = heads.reshape(-1, spec.n_heads * spec.head_dim).float() * s
        a = a.reshape(-1, spec.intermediate).float() * s
        self.heads = add_gram(self.heads, o)
        self.mlp = add_gram(self.mlp, a, placement=self.placement)
        self.update += ((y - x).reshape(-1, spec.hidden).float() * s).double().pow(2).sum().item()
        self.tokens += s.shape[0]
        if self.per_window:
            k = self.per_window * x.shape[0]
            pick = torch.randperm(s.shape[0], generator=self.generator)[:k].sort().values.to(x.device)
            self.sample.append((x.reshape(-1, spec.hidden)[pick], heads.reshape(-1, spec.n_heads * spec.head_dim)[pick],
                                y.reshape(-1, spec.hidden)[pick]))
        return y

    def skip(self, windows: int, seq_len: int) -> None:
        """Another rank's micro-batch: draw its token sample from the random stream (and drop it),
        so every rank's sample is the one a single process draws."""
        if self.per_window:
            torch.randperm(windows * seq_len, generator=self.generator)

    def combine(self, ranks: Ranks) -> None:
        """Add the other ranks' sums and gather their token samples (in window order)."""
        if ranks.world == 1:
            return
        ranks.sum_(self.heads)
        ranks.sum_(self.mlp)
        self.update = ranks.sum_float(self.update)
        self.tokens = int(ranks.sum_float(self.tokens))
        if self.per_window:
            self.sample = [tuple(ranks.gather(torch.cat(t)) for t in zip(*self.sample))]

    @property
    def norm(self) -> float:
        """sum_t w_t |y_t|^2 = E per token (w_t = 1 / mean(y_t^2)): divides weighted errors into the unit."""
        return float(self.spec.hidden * max(self.tokens, 1))


def columns(units: torch.Tensor, width: int) -> torch.Tensor:
    """Column indices of `units` that are `width` columns each (a head's D outputs)."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


def removal_cost(W: torch.Tensor, G: torch.Tensor, Hinv: torch.Tensor | None, cols: torch.Tensor) -> float:
    """Weighted squared output error of zeroing the input columns `cols` of W (out, in): with an
    optimal refit of the others (OBS, Hinv = (G + ridge)^-1) or without (Hinv None)."""
    if cols.numel() == 0:
        return 0.0
    Wr = W[:, cols].to(G.dtype)
    if Hinv is None:
        return (Wr @ G[cols][:, cols] * Wr).sum().item()
    return (Wr.T * solve(Hinv[cols][:, cols], Wr.T)).sum().item()


def head_costs(W, G: torch.Tensor, spec: BlockSpec, refit: bool, sample) -> dict[tuple[int, int], float]:
    """Cost of every GQA head layout (n_kv, group), measured at the block output on `sample` (x,
    head outputs, y at some tokens), so the MLP's reaction to the attention error counts. The
    heads a layout removes are chosen by each head's cost alone (as selection.select_units keeps
    the best); o_proj is then refit (OBS: the kept heads absorb the removed ones) or not."""
    D, W_o = spec.head_dim, W["o"]
    Hinv = invert_spd(with_ridge(G)) if refit else None
    alone = torch.tensor([removal_cost(W_o, G, Hinv, columns(torch.tensor([h]), D)) for h in range(spec.n_heads)])
    x, o, y = (torch.cat(t) for t in zip(*sample))
    weight = 1 / mean_square(y.double())  # as the next RMSNorm sees each token
    costs = {}
    for kv in range(1, spec.n_kv + 1):
        for g in range(1, spec.group + 1):
            kept = select_units(alone, torch.zeros(spec.intermediate), spec, Sizes(kv, g, spec.intermediate)).heads
            removed = torch.tensor(sorted(set(range(spec.n_heads)) - set(kept.tolist())), dtype=torch.long)
            W_new = refit_columns(W_o, Hinv, columns(removed, D).to(W_o.device))
            h = x + F.linear(o, W_new, W.get("o_bias"))
            y_cut = h + mlp_output(W, spec, h)
            costs[(kv, g)] = ((y_cut - y).double().pow(2).sum(-1) * weight).sum().item() / (spec.hidden * len(y))
    return costs


def refit_columns(W: torch.Tensor, Hinv: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """W (out, in) without its input columns `cols`: the others refit by OBS (W - W_R Hinv_RR^-1 Hinv_R:),
    or (Hinv None) just zeroed."""
    W_new = W.clone()
    if cols.numel() == 0:
        return W_new
    if Hinv is not None:
        M = solve(Hinv[cols][:, cols], Hinv[cols, :])  # (|R|, in)
        W_new = (W.to(Hinv.dtype) - W[:, cols].to(Hinv.dtype) @ M).to(W.dtype)
    W_new[:, cols] = 0
    return W_new


def with_ridge(G: torch.Tensor) -> torch.Tensor:
    G = G.clone()
    add_ridge(G, RIDGE)
    return G


def neuron_curve(W_down: torch.Tensor, G: torch.Tensor, refit: bool, timer=None) -> list[tuple[int, float]]:
    """(neurons kept, cost) from all neurons down to CURVE_KEEP of them, CURVE_STEPS points. With a
    refit: greedy OBS (consumes G). Without: the cheapest alone first, their joint output cost."""
    I = G.shape[0]
    n_remove = I - max(1, round(I * CURVE_KEEP))
    curve: list[tuple[int, float]] = []
    if refit:
        greedy_removal_scores(G, W_down, n_remove, chunks=CURVE_STEPS, curve=curve, timer=timer)
    else:
        W = W_down.to(G.device, G.dtype)
        P = (W.T @ W) * G  # (I, I): the joint output energy of neurons i and j
        order = P.diagonal().argsort()
        step = max(1, -(-n_remove // CURVE_STEPS))
        total, done = 0.0, 0
        while done < n_remove:
            new, old = order[done:min(done + step, n_remove)], order[:done]
            total += 2 * P[new][:, old].sum().item() + P[new][:, new].sum().item()
            done += len(new)
            curve.append((done, total))
    return [(I, 0.0)] + [(I - r, c) for r, c in curve]


def block_costs(W, spec: BlockSpec, calib: Calibration, refit: bool,
                write: Callable[[int, torch.Tensor], None]) -> BlockCosts:
    """One pass over the block's dense calibration inputs (`calib`, scoring.base.Calibration): the
    costs of its cuts, in the unit of this module; `write(start, y)` receives the dense outputs (the
    next block's inputs), start counted in this rank's windows."""
    timer, T = calib.timer, calib.cos.shape[0]
    per_window = -(-SAMPLE_TOKENS // max(1, calib.samples))  # tokens of each window in the head sample
    grams, start = Grams(spec, calib.generator, per_window, calib.placement), 0
    for b, x in calib.every_batch():  # (several ranks: every micro-batch draws its token sample)
        if x is None:
            grams.skip(b, T)
            continue
        with phase(timer, "survey_gram"):
            y = grams.add(W, x, calib.cos, calib.sin, timer)
        with phase(timer, "cache_write"):
            write(start, y)
        start += x.shape[0]
    grams.combine(calib.ranks)
    norm = grams.norm
    with phase(timer, "survey_heads"):
        heads = head_costs(W, grams.heads, spec, refit, grams.sample)
    with phase(timer, "survey_neurons"):
        neurons = neuron_curve(W["down"], grams.mlp, refit, timer)
    return BlockCosts(heads, [(n, c / norm) for n, c in neurons], grams.update / norm)
