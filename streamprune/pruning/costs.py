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
outputs and of the MLP activations, the token sample, and the update energy.

The refits are fit on the calibration tokens outside the sample and their costs measured on the
sample: held out. With few tokens per Gram column (8,192 tokens for 4,864 or 8,960 neurons) a
refit reproduces the tokens it was fit on 10-30 times better than others, by a factor that
differs from block to block, and costs measured on the fitting tokens then send the allocation's
cuts to the blocks where they look cheapest, not where they are (docs/quality.md). The same
held-out tokens choose each block's ridges (numerics.Ridges), which the pruning pass refits with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..arch.spec import BlockSpec
from .block import attention_heads, attention_output, mlp_activations, mlp_output, rms_norm
from .numerics import (
    ON_DEVICE,
    RIDGE,
    GramPlacement,
    Ridges,
    add_gram,
    add_ridge,
    held_out_refit,
    invert_spd,
    mean_square,
    solve,
    token_scale,
)
from .phases import phase
from .ranks import Ranks
from .scoring.base import Calibration
from .scoring.obs import greedy_removal_scores
from .selection import Sizes, select_units

CURVE_STEPS = 16  # points of a block's neuron curve
SAMPLE_TOKENS = 2048  # held-out calibration tokens the costs are measured on
SAMPLE_SHARE = 4  # at most one token in this many of each window is held out (the others fit the refits)
CURVE_KEEP = 1 / 16  # the curve runs down to this fraction of the neurons (then extrapolates)
# fewer calibration tokens than this per neuron of the widest MLP: costs held out (held_out_survey)
TOKENS_PER_NEURON = 8


def held_out_survey(blocks, tokens: int) -> bool:
    """Whether the survey holds tokens out of its refits and measures its costs (and ridges, and the
    blocks' sensitivities, sensitivity.py) on them: where the calibration has fewer than
    TOKENS_PER_NEURON tokens per neuron of the widest MLP, in-sample costs of a down_proj refit are
    10-30x too low, unevenly across blocks (Qwen2.5-Coder-0.5B at 8,192 tokens for 4,864 neurons:
    held out, +30.9% at 30% against +44.0% in-sample); with many tokens per neuron the in-sample
    costs on every token serve better (SmolLM2-135M at 16,384 for 1,536: +30.8% in-sample, +36.6%
    held out). docs/quality.md."""
    return tokens < TOKENS_PER_NEURON * max(b.intermediate for b in blocks)


@dataclass(frozen=True)
class BlockCosts:
    """heads[(kv groups kept, heads kept per group)] and neurons [(neurons kept, cost)], kept
    descending from all (cost 0); drop: the cost of removing the whole block; ridges: the refits'
    ridges chosen on the held-out tokens (None: a survey that held none out)."""

    heads: dict[tuple[int, int], float]
    neurons: list[tuple[int, float]]
    drop: float
    ridges: Ridges | None = None

    def as_json(self) -> dict:
        d = {"heads": [[kv, g, c] for (kv, g), c in sorted(self.heads.items())],
             "neurons": [list(p) for p in self.neurons], "drop": self.drop}
        return d if self.ridges is None else dict(d, ridges=self.ridges.as_json())

    @classmethod
    def from_json(cls, d: dict) -> "BlockCosts":
        return cls({(int(kv), int(g)): float(c) for kv, g, c in d["heads"]},
                   [(int(n), float(c)) for n, c in d["neurons"]], float(d["drop"]),
                   Ridges.from_json(d["ridges"]) if "ridges" in d else None)

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
    accumulated over micro-batches, with the update energy and the token count. With `per_window`,
    that many tokens of each window are held out: kept in `sample`, left out of the Gram matrices."""

    def __init__(self, spec: BlockSpec, generator: torch.Generator | None = None, per_window: int = 0,
                 placement: GramPlacement = ON_DEVICE, hold_out: bool = True):
        self.spec, self.placement = spec, placement
        self.heads = self.mlp = None
        self.update = 0.0
        self.tokens = self.fitted = 0  # all tokens; those in the Gram matrices
        self.generator, self.per_window = generator, per_window  # tokens of each window kept in `sample`
        self.hold_out = hold_out  # the sample's tokens left out of the Gram matrices
        # (x, head outputs, y, weighted MLP activations) at those tokens
        self.sample: list[tuple[torch.Tensor, ...]] = []

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
        self.update += ((y - x).reshape(-1, spec.hidden).float() * s).double().pow(2).sum().item()
        self.tokens += s.shape[0]
        o = heads.reshape(-1, spec.n_heads * spec.head_dim)
        a = a.reshape(-1, spec.intermediate).float() * s
        fit = s
        if self.per_window:
            k = self.per_window * x.shape[0]
            pick = torch.randperm(s.shape[0], generator=self.generator)[:k].sort().values.to(x.device)
            self.sample.append((x.reshape(-1, spec.hidden)[pick], o[pick], y.reshape(-1, spec.hidden)[pick], a[pick]))
            if self.hold_out:
                fit = s.clone()
                fit[pick] = 0  # held out: not in the Gram matrices
                a = a * (fit > 0)
        self.heads = add_gram(self.heads, o.float() * fit)
        self.mlp = add_gram(self.mlp, a, placement=self.placement)
        self.fitted += int((fit > 0).sum())
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
        self.tokens, self.fitted = int(ranks.sum_float(self.tokens)), int(ranks.sum_float(self.fitted))
        if self.per_window:
            self.sample = [tuple(ranks.gather(torch.cat(t)) for t in zip(*self.sample))]

    @property
    def norm(self) -> float:
        """sum_t w_t |y_t|^2 = E per token (w_t = 1 / mean(y_t^2)): divides weighted errors into the unit."""
        return float(self.spec.hidden * max(self.tokens, 1))

    def held_out(self) -> tuple[torch.Tensor, ...] | None:
        """The held-out tokens' (x, head outputs, y, weighted MLP activations), or None."""
        return tuple(torch.cat(t) for t in zip(*self.sample)) if self.sample else None


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


def head_costs(W, G: torch.Tensor, spec: BlockSpec, refit: bool, sample, ridge: float = RIDGE
               ) -> dict[tuple[int, int], float]:
    """Cost of every GQA head layout (n_kv, group), measured at the block output on `sample` (x,
    head outputs, y at some tokens), so the MLP's reaction to the attention error counts. The
    heads a layout removes are chosen by each head's cost alone (as selection.select_units keeps
    the best); o_proj is then refit (OBS with `ridge`: the kept heads absorb the removed ones) or not."""
    D, W_o = spec.head_dim, W["o"]
    Hinv = invert_spd(with_ridge(G, ridge)) if refit else None
    alone = head_costs_alone(W_o, G, Hinv, spec)
    x, o, y = sample[:3]
    weight = 1 / mean_square(y.double())  # as the next RMSNorm sees each token
    costs = {}
    for kv in range(1, spec.n_kv + 1):
        for g in range(1, spec.group + 1):
            if (kv, g) == (spec.n_kv, spec.group):  # every head kept: nothing removed, nothing to measure
                costs[(kv, g)] = 0.0
                continue
            removed = removed_heads(alone, spec, kv, g)
            W_new = refit_columns(W_o, Hinv, columns(removed, D).to(W_o.device))
            h = x + F.linear(o, W_new, W.get("o_bias"))
            y_cut = h + mlp_output(W, spec, h)
            costs[(kv, g)] = ((y_cut - y).double().pow(2).sum(-1) * weight).sum().item() / (spec.hidden * len(y))
    return costs


def head_costs_alone(W_o: torch.Tensor, G: torch.Tensor, Hinv: torch.Tensor | None, spec: BlockSpec) -> torch.Tensor:
    """(H,) each head's removal cost alone (with o_proj refit when Hinv is given)."""
    return torch.tensor([removal_cost(W_o, G, Hinv, columns(torch.tensor([h]), spec.head_dim))
                         for h in range(spec.n_heads)])


def removed_heads(alone: torch.Tensor, spec: BlockSpec, kv: int, g: int) -> torch.Tensor:
    """The heads a layout (kv groups of g heads) removes, chosen by their costs alone."""
    kept = select_units(alone, torch.zeros(spec.intermediate), spec, Sizes(kv, g, spec.intermediate)).heads
    return torch.tensor(sorted(set(range(spec.n_heads)) - set(kept.tolist())), dtype=torch.long)


def reference_units(W, spec: BlockSpec, grams: Grams) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference cuts' units, chosen by their costs alone (without a refit): the heads removed
    (about half of each group; of the groups, without GQA) and the neurons kept (half)."""
    alone = head_costs_alone(W["o"], grams.heads, None, spec)
    removed = removed_heads(alone, spec, spec.n_kv, max(1, spec.group // 2)) if spec.group > 1 else \
        removed_heads(alone, spec, max(1, spec.n_kv // 2), 1)
    worth = grams.mlp.diagonal().to(W["down"].device, torch.float32) * W["down"].float().pow(2).sum(0)
    keep_neurons = worth.argsort(descending=True, stable=True)[:max(1, spec.intermediate // 2)].sort().values
    return removed, keep_neurons


def block_ridges(W, spec: BlockSpec, grams: Grams, sample) -> tuple[Ridges, dict[str, torch.Tensor]]:
    """Each refit's ridge, chosen on the held-out tokens (numerics.held_out_refit) for the
    reference cuts (reference_units). Also those two cuts, refit under their ridges: {"o": o_proj,
    "down": down_proj}, the removed columns zero (what sensitivity.py probes with)."""
    o, a = sample[1], sample[3]
    scale = token_scale(sample[2]).reshape(-1, 1)
    removed, keep_neurons = reference_units(W, spec, grams)
    keep_heads = columns(torch.tensor(sorted(set(range(spec.n_heads)) - set(removed.tolist()))), spec.head_dim)
    heads, o_cut = held_out_refit(grams.heads, W["o"], keep_heads, o.float() * scale)
    neurons, down_cut = held_out_refit(grams.mlp, W["down"], keep_neurons, a)
    cuts = {"o": o_cut.to(W["o"].device, W["o"].dtype), "down": down_cut.to(W["down"].device, W["down"].dtype)}
    return Ridges(heads, neurons), cuts


def zeroed_cuts(W, spec: BlockSpec, grams: Grams) -> dict[str, torch.Tensor]:
    """The reference cuts without a refit: the removed heads' and neurons' columns zeroed."""
    removed, keep_neurons = reference_units(W, spec, grams)
    down = torch.zeros_like(W["down"])
    down[:, keep_neurons.to(down.device)] = W["down"][:, keep_neurons.to(down.device)]
    return {"o": refit_columns(W["o"], None, columns(removed, spec.head_dim).to(W["o"].device)), "down": down}


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


def with_ridge(G: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    G = G.clone()
    add_ridge(G, ridge)
    return G


def neuron_curve(W_down: torch.Tensor, G: torch.Tensor, refit: bool, timer=None, ridge: float = RIDGE,
                 held_out: torch.Tensor | None = None) -> list[tuple[int, float]]:
    """(neurons kept, cost) from all neurons down to CURVE_KEEP of them, CURVE_STEPS points. With a
    refit: greedy OBS (consumes G), its error on the fitting tokens or (`held_out`: the weighted
    activations of other tokens) on those. Without: the cheapest alone first, their joint output cost."""
    I = G.shape[0]
    n_remove = I - max(1, round(I * CURVE_KEEP))
    curve: list[tuple[int, float]] = []
    if refit:
        greedy_removal_scores(G, W_down, n_remove, chunks=CURVE_STEPS, ridge=ridge, curve=curve, timer=timer,
                              held_out=held_out)
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
    return [(I, 0.0)] + [(I - r, c) for r, c in rising(curve)]


def rising(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The curve with each cost at least the one before (a held-out measurement is noisy; removing
    more never helps the refit of what is left)."""
    out, top = [], 0.0
    for n, c in curve:
        top = max(top, c)
        out.append((n, top))
    return out


def block_costs(W, spec: BlockSpec, calib: Calibration, refit: bool,
                write: Callable[[int, torch.Tensor], None], cuts: dict | None = None,
                held_out: bool = True) -> BlockCosts:
    """One pass over the block's dense calibration inputs (`calib`, scoring.base.Calibration): the
    costs of its cuts, in the unit of this module; `write(start, y)` receives the dense outputs (the
    next block's inputs), start counted in this rank's windows. The sample of held-out tokens: up
    to SAMPLE_TOKENS, at most one token in SAMPLE_SHARE of each window; without `held_out`
    (held_out_survey) the sample is in the Gram matrices too, the costs are measured on the
    fitting tokens and the ridges are the fixed RIDGE. `cuts`, if given, receives block_ridges'
    reference cuts (held out, with a refit; otherwise the same units' columns zeroed)."""
    timer, T = calib.timer, calib.cos.shape[0]
    per_window = -(-SAMPLE_TOKENS // max(1, calib.samples))
    if held_out:
        per_window = min(per_window, max(1, T // SAMPLE_SHARE))
    grams, start = Grams(spec, calib.generator, per_window, calib.placement, held_out), 0
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
    sample = grams.held_out()
    ridges, measured = None, refit and held_out
    if measured:
        with phase(timer, "survey_ridges"):
            ridges, reference = block_ridges(W, spec, grams, sample)
        if cuts is not None:
            cuts.update(reference)
    elif cuts is not None:
        cuts.update(zeroed_cuts(W, spec, grams))
    with phase(timer, "survey_heads"):
        heads = head_costs(W, grams.heads, spec, refit, sample, ridges.heads if measured else RIDGE)
    with phase(timer, "survey_neurons"):
        if measured:  # on the held-out tokens
            n_sample = float(spec.hidden * sample[3].shape[0])
            neurons = [(n, c / n_sample) for n, c in neuron_curve(W["down"], grams.mlp, True, timer, ridges.neurons,
                                                                  held_out=sample[3])]
        else:  # on the fitting tokens
            n_fitted = float(spec.hidden * max(grams.fitted, 1))
            neurons = [(n, c / n_fitted) for n, c in neuron_curve(W["down"], grams.mlp, refit, timer)]
    return BlockCosts(heads, neurons, grams.update / grams.norm, ridges)
