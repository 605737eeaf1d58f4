"""The default scorer. Heads by perturbative regression (the idea of Bonsai, arXiv 2402.05406,
applied locally to one block): run the block many times with random valid subsets of its heads
removed, measure how far each pruned output lands from the dense output, and fit a linear model
from "which heads were removed" to that error. A head's coefficient is its marginal cost of
removal, averaged over the company it keeps, and it counts the MLP's reaction: interactions that
one-at-a-time metrics cannot see. Then neurons, behind the chosen heads, by greedy Optimal Brain
Surgeon on down_proj (obs.py): their cost once least-squares compensation has refit the rest.

Cheap by construction: head outputs do not depend on the masks, so attention runs once; every
mask then needs only o_proj and the MLP, on a random subset of calibration tokens, many masks per
pass. The regression is ridge regression towards a prior (each unit's error when removed alone,
at its own sublayer), solved in its dual form (masks x masks)."""

from __future__ import annotations

import torch

from ...arch.spec import BlockSpec
from ..block import attention_heads, attention_output, mlp_activations, mlp_output, rms_norm
from ..numerics import RIDGE, NormalEquations, add_gram, one_thread, token_scale, token_weight
from ..phases import phase
from ..selection import Sizes, select_units
from .base import Calibration, Scorer, UnitScores
from .obs import down_equations, greedy_removal_scores, head_columns, refit_attention
from .obs import memory_bytes as obs_memory_bytes

MASKS = 24  # head perturbations per block at --budget 1 (64 before 2026-12-04: docs/scoring.md)
TOKENS = 768  # calibration tokens each perturbation is measured on, at --budget 1 (2048 before)
PASS_BYTES = 256 * 2**20  # activations of one batch of masked forwards
RIDGES = (0.1, 1.0, 10.0, 100.0, 1000.0)  # ridge strengths tried, relative to the mean squared feature norm


class TokenSample:
    """Block inputs x, per-head outputs o and dense block outputs y at randomly chosen tokens."""

    def __init__(self, W, spec: BlockSpec, calib: Calibration, n_tokens: int, head_gram: bool = False):
        xs, os, ys, seen, drawn = [], [], [], 0, 0
        total, E = calib.samples, spec.hidden
        # the pass runs the dense block on every token: its outputs are kept for later passes
        # (calib.targets), and with `head_gram` the Gram of the head outputs, which gives o_proj's refit
        keep = calib.targets.keeper() if calib.targets is not None and not calib.targets.ready else None
        self.head_gram = None
        # every rank draws the tokens of every micro-batch (one random stream, as one process
        # would), and keeps those of its own
        for b, x in calib.every_batch():
            if total:  # an even share of the budget per micro-batch
                k = round(n_tokens * (seen + b) / total) - round(n_tokens * seen / total)
            else:
                k = n_tokens - drawn
            seen += b
            T = calib.cos.shape[0] if x is None else x.shape[1]
            k = min(k, b * T)
            pick = torch.randperm(b * T, generator=calib.generator)[:k].sort().values if k > 0 else None
            drawn += max(k, 0)
            if x is None:
                continue
            heads = attention_heads(W, spec, x, calib.cos, calib.sin)
            h = x + attention_output(W, heads)
            y = h + mlp_output(W, spec, h)
            if keep is not None:
                keep.add(y)
            if head_gram:  # weighted as compensation weighs the attention refit: 1 / rms(x + attention)
                scale = token_scale(h - W.get("o_bias", 0)).reshape(-1, 1)
                o = heads.reshape(-1, spec.n_heads * spec.head_dim).float() * scale
                self.head_gram = add_gram(self.head_gram, o, placement=calib.placement)
            if pick is None:
                continue
            pick = pick.to(x.device)
            xs.append(x.reshape(-1, E)[pick])
            os.append(heads.reshape(b * T, spec.n_heads, spec.head_dim)[pick])
            ys.append(y.reshape(-1, E)[pick])
        if keep is not None:
            keep.done()
        if head_gram:
            self.head_gram = calib.ranks.sum_(self.head_gram)
        if not xs:  # this rank drew no token (more micro-batches than tokens): its share is empty
            like = W["o"]
            xs, ys = [like.new_empty(0, E)], [like.new_empty(0, E)]
            os = [like.new_empty(0, spec.n_heads, spec.head_dim)]
        self.x, self.o, self.y = (calib.ranks.gather(torch.cat(t)) for t in (xs, os, ys))
        # the next block reads y through an RMSNorm, so an error counts relative to the size of its
        # token: weights 1 / mean(y_t^2) turn squared errors into errors after normalisation
        self.weight = token_weight(self.y)
        self.update_energy = self.weighted((self.y - self.x).double().pow(2).sum(-1)).item() or 1.0

    def weighted(self, per_token: torch.Tensor) -> torch.Tensor:
        """Sum over tokens (the last dim) of per-token squared errors times the token weights."""
        return (per_token.double() * self.weight.to(per_token.device)).sum(-1)

    def __len__(self) -> int:
        return self.x.shape[0]


def masked_errors(W, spec: BlockSpec, s: TokenSample, head_keep: torch.Tensor, per_pass: int) -> torch.Tensor:
    """Relative squared error of the block output for each of M head masks: (M,) fp64."""
    errors = []
    for i in range(0, head_keep.shape[0], per_pass):
        hk = head_keep[i:i + per_pass].to(s.o.device)
        # the token sample is one batch of n tokens: (1, n, H, D) -> outputs (m, 1, n, E)
        h = s.x + attention_output(W, s.o[None], hk)
        y = (h + mlp_output(W, spec, h))[:, 0]
        errors.append(s.weighted((y - s.y[None]).double().pow(2).sum(-1)).cpu())
    return torch.cat(errors) / s.update_energy


def alone_errors(W, spec: BlockSpec, s: TokenSample) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior: each unit's relative error when removed alone, measured at its own sublayer."""
    Wo = W["o"].view(spec.hidden, spec.n_heads, spec.head_dim)
    heads = s.weighted(torch.einsum("nhd,ehd->hne", s.o, Wo).double().pow(2).sum(-1)).cpu()
    h = s.x + attention_output(W, s.o)
    a = mlp_activations(W, rms_norm(h, W["mlp_norm"], spec.eps))
    neurons = s.weighted(a.double().pow(2).T).cpu() * W["down"].double().pow(2).sum(0).cpu()
    return heads / s.update_energy, neurons / s.update_energy


def sample_masks(spec: BlockSpec, sizes: Sizes, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random keep-masks shaped like the real cut: `sizes.n_kv` whole KV groups, `sizes.group`
    query heads in each, `sizes.intermediate` neurons — every mask is a valid GQA block."""
    heads = torch.zeros(n, spec.n_kv, spec.group)
    groups = torch.rand(n, spec.n_kv, generator=g).argsort(1)[:, :sizes.n_kv]
    within = torch.rand(n, sizes.n_kv, spec.group, generator=g).argsort(2)[:, :, :sizes.group]
    heads[torch.arange(n)[:, None, None], groups[:, :, None], within] = 1
    neurons = torch.zeros(n, spec.intermediate)
    order = torch.rand(n, spec.intermediate, generator=g).argsort(1)[:, :sizes.intermediate]
    neurons.scatter_(1, order, 1.0)
    return heads.view(n, spec.n_heads), neurons


@one_thread()
def fit_removal_costs(removed: torch.Tensor, errors: torch.Tensor, prior: torch.Tensor,
                      ridge: float | None = None) -> tuple[torch.Tensor, dict]:
    """Linear model errors ~ c + removed @ beta, with beta shrunk towards a scaled prior:
    beta = s * prior + delta, (c, s) by least squares, delta by ridge regression in dual form.
    The ridge strength (relative to the mean squared norm of the centred features) is `ridge`,
    or, by default, the one of RIDGES with the least leave-one-out error: noisy measurements
    lean on the prior, clean ones on the masks. removed: (M, U) 0/1; errors: (M,); prior: (U,).
    Returns beta (U,) and fit diagnostics."""
    R, e = removed.double(), errors.double()
    p = R @ prior.double()
    var_p = (p - p.mean()).pow(2).sum().item()  # (c, s) in closed form: lstsq's pivoting is not reproducible
    s = max(((p - p.mean()) * (e - e.mean())).sum().item() / var_p, 0.0) if var_p > 0 else 0.0
    c = (e.mean() - s * p.mean()).item()
    res = e - c - s * p
    res = res - res.mean()
    Rc = R - R.mean(0)
    K = Rc @ Rc.T
    scale, eye = max(K.diagonal().mean().item(), 1e-12), torch.eye(len(e), dtype=K.dtype)
    best = None
    for r in ([ridge] if ridge is not None else RIDGES):
        inv = torch.linalg.inv(K + r * scale * eye)
        alpha = inv @ res
        loo = (alpha / inv.diagonal()).pow(2).mean().item()  # leave-one-out residuals of kernel ridge
        if best is None or loo < best[0]:
            best = (loo, r, alpha)
    _, r, alpha = best
    beta = s * prior.double() + Rc.T @ alpha
    ss_tot = (e - e.mean()).pow(2).sum().item()
    r2 = 1 - (e - e.mean() - Rc @ beta).pow(2).sum().item() / ss_tot if ss_tot > 0 else 1.0
    return beta, {"prior_scale": round(s, 6), "ridge": r, "fit_r2": round(r2, 4)}


class PerturbScorer(Scorer):
    name = "perturb"

    def sample_sizes(self) -> tuple[int, int]:
        """Head perturbations and tokens per block."""
        return max(16, round(MASKS * self.options.budget)), max(64, round(TOKENS * self.options.budget))

    def forward_passes(self, calibration_tokens: int) -> float:
        """The token sample's dense pass, the masked passes, and (with a refit) the Gram pass."""
        return 1.0 + self.options.refit + self.sample_passes(calibration_tokens)

    def sample_passes(self, calibration_tokens: int) -> float:
        n_masks, n_tokens = self.sample_sizes()
        return n_masks * min(n_tokens, calibration_tokens) / calibration_tokens

    def work_bytes(self, spec: BlockSpec) -> int:
        n_masks, n_tokens = self.sample_sizes()
        sample = 4 * n_tokens * (2 * spec.hidden + spec.n_heads * spec.head_dim + spec.intermediate)
        regression = PASS_BYTES + sample + 3 * 8 * n_masks * spec.n_heads + 3 * 8 * n_masks ** 2
        return max(regression, obs_memory_bytes(spec) if self.options.refit else 0)

    def score(self, W: dict[str, torch.Tensor], spec: BlockSpec, calib: Calibration) -> UnitScores:
        n_masks, n_tokens = self.sample_sizes()
        sizes, refit = self.options.sizes, self.options.refit
        cut_heads = sizes is not None and sizes.n_heads < spec.n_heads
        cut_neurons = sizes is not None and sizes.intermediate < spec.intermediate
        if refit and cut_neurons and not cut_heads:  # neurons alone: one pass gives the OBS Gram and the refit
            with phase(calib.timer, "obs_gram"):
                eq = down_equations(W, spec, calib)
            calib.shared["mlp"] = (torch.arange(spec.n_heads), eq)
            neurons = greedy_scores(eq, W["down"], spec.intermediate - sizes.intermediate, calib.timer,
                                    calib.ridges.neurons)
            return UnitScores(torch.zeros(spec.n_heads), neurons, {"perturbations": 0, "neurons": "greedy OBS"})
        with phase(calib.timer, "token_sample"):
            sample = TokenSample(W, spec, calib, n_tokens, head_gram=refit and cut_heads)
            prior_heads, prior_neurons = alone_errors(W, spec, sample)
        if not (cut_heads or cut_neurons):
            return UnitScores(prior_heads, prior_neurons, {"perturbations": 0})
        info = {"perturbations": 0, "tokens": len(sample)}
        heads = prior_heads
        if cut_heads:  # heads, all neurons present, on random valid head cuts
            per_token = 4 * spec.hidden + spec.n_heads * spec.head_dim + 3 * spec.intermediate
            per_pass = max(1, min(n_masks, PASS_BYTES // (4 * len(sample) * per_token)))
            with phase(calib.timer, "head_perturbations"):
                head_keep = sample_masks(spec, sizes, n_masks, calib.generator)[0]
                errors = masked_errors(W, spec, sample, head_keep, per_pass)
                heads, fit = fit_removal_costs(1 - head_keep, errors, prior_heads)
            # how many kept heads the perturbations changed against each head's cost alone (the prior)
            changed = len(set(select_units(prior_heads, prior_neurons, spec, sizes).heads.tolist())
                          - set(select_units(heads, prior_neurons, spec, sizes).heads.tolist()))
            info.update(perturbations=n_masks, masks_per_pass=per_pass,
                        heads={"mean_error": round(errors.mean().item(), 6), "changed": changed, **fit})
        head_gram, sample = sample.head_gram, None
        neurons = prior_neurons  # without a refit a neuron costs what it contributes alone
        if refit:  # heads cut (an uncut block returned above): o_proj's refit, and the neurons by greedy OBS
            kept_heads = select_units(heads, prior_neurons, spec, sizes).heads
            with phase(calib.timer, "compensation_solve"):
                calib.shared["attention"] = (kept_heads, refit_attention(head_gram, W["o"], spec, kept_heads,
                                                                         calib.ridges.heads))
            del head_gram
            if cut_neurons:  # behind the kept heads with o_proj as it is: measured better than behind the refit one
                unrefit = W["o"][:, head_columns(kept_heads, spec.head_dim).to(W["o"].device)]
                with phase(calib.timer, "obs_gram"):
                    eq = down_equations(W, spec, calib, kept_heads, unrefit, rhs=False)
                neurons = greedy_removal_scores(eq.G, W["down"], spec.intermediate - sizes.intermediate,
                                                ridge=calib.ridges.neurons, timer=calib.timer)
                info["neurons"] = "greedy OBS"
        return UnitScores(heads, neurons, info)


def greedy_scores(eq: NormalEquations, W_down: torch.Tensor, n_remove: int, timer=None, ridge: float = RIDGE
                  ) -> torch.Tensor:
    """Greedy OBS on the equations' Gram, left as it was for compensation (the greedy adds a ridge)."""
    diagonal = eq.G.diagonal().clone()
    scores = greedy_removal_scores(eq.G, W_down, n_remove, ridge=ridge, timer=timer)
    eq.G.diagonal().copy_(diagonal)
    return scores
