"""costs.py beyond what test_allocation.py covers (Grams, block_costs): BlockCosts as JSON and
its neuron curve between and beyond its points, and the neuron curve itself."""

import pytest
import torch

from streamprune.pruning.costs import (
    CURVE_KEEP,
    CURVE_STEPS,
    TOKENS_PER_NEURON,
    BlockCosts,
    Grams,
    block_costs,
    held_out_survey,
    neuron_curve,
    rising,
)
from streamprune.pruning.numerics import Ridges
from streamprune.pruning.scoring import Calibration
from tests.models import SPEC, random_block

COSTS = BlockCosts({(2, 1): 0.5, (1, 2): 0.75, (2, 2): 0.0, (1, 1): 1.25},
                   [(48, 0.0), (40, 0.125), (24, 0.5)], drop=3.0)


def test_as_json_is_plain_sorted_json_and_from_json_gives_the_costs_back():
    d = COSTS.as_json()
    assert d == {"heads": [[1, 1, 1.25], [1, 2, 0.75], [2, 1, 0.5], [2, 2, 0.0]],
                 "neurons": [[48, 0.0], [40, 0.125], [24, 0.5]], "drop": 3.0}
    assert BlockCosts.from_json(d) == COSTS
    # what JSON gives back (integral floats, ints for costs) comes back typed
    back = BlockCosts.from_json({"heads": [[1.0, 2.0, 1]], "neurons": [[8.0, 0]], "drop": 2})
    assert back.heads == {(1, 2): 1.0} and type(next(iter(back.heads))[0]) is int
    assert back.neurons == [(8, 0.0)] and type(back.neurons[0][0]) is int and type(back.drop) is float


def test_mlp_is_zero_at_all_neurons_linear_between_points_and_extrapolated_past_the_end():
    assert COSTS.mlp(48) == 0.0 and COSTS.mlp(60) == 0.0
    assert COSTS.mlp(40) == pytest.approx(0.125) and COSTS.mlp(24) == pytest.approx(0.5)
    assert COSTS.mlp(44) == pytest.approx(0.0625)  # halfway between 48 and 40
    assert COSTS.mlp(32) == pytest.approx(0.3125)  # halfway between 40 and 24
    assert COSTS.mlp(8) == pytest.approx(0.875)  # the last segment's slope, 16 neurons further
    assert COSTS.mlp(0) == pytest.approx(1.0625)


def gram(n: int, tokens: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, n, dtype=torch.float64)
    W = torch.randn(16, n, generator=g, dtype=torch.float64)
    return W, A.T @ A


def test_neuron_curve_without_refit_is_the_removed_neurons_joint_output_cost():
    I = 64
    W, G = gram(I)
    curve = neuron_curve(W, G, refit=False)
    kept = [n for n, _ in curve]
    assert curve[0] == (I, 0.0) and kept[-1] == max(1, round(I * CURVE_KEEP))
    assert kept == sorted(kept, reverse=True) and len(curve) <= CURVE_STEPS + 1
    costs = [c for _, c in curve]
    assert all(b > a for a, b in zip(costs, costs[1:]))  # increasing in the neurons removed
    P = (W.T @ W) * G
    order = P.diagonal().argsort()
    for n, c in curve[1:]:
        removed = order[:I - n]
        assert c == pytest.approx(P[removed][:, removed].sum().item(), rel=1e-9)


def test_neuron_curve_with_refit_runs_the_same_points_and_grows():
    I = 32
    W, G = gram(I, seed=1)
    plain = neuron_curve(W, G.clone(), refit=False)
    refit = neuron_curve(W, G.clone(), refit=True)  # greedy OBS (on G plus its ridge)
    assert [n for n, _ in refit] == [n for n, _ in plain]
    assert refit[0] == (I, 0.0) and refit[-1][0] == max(1, round(I * CURVE_KEEP))
    costs = [c for _, c in refit]
    assert all(b > a for a, b in zip(costs, costs[1:]))


def test_the_neuron_curve_on_held_out_tokens_is_costlier_than_on_the_fitting_ones_and_never_falls():
    # 40 fitting tokens for 32 neurons: the refit reproduces them far better than other tokens
    I, g = 32, torch.Generator().manual_seed(2)
    W = torch.randn(16, I, generator=g, dtype=torch.float64)
    fit, other = (torch.randn(n, I, generator=g, dtype=torch.float64) for n in (40, 400))
    inside = neuron_curve(W, fit.T @ fit, refit=True)
    held = neuron_curve(W, fit.T @ fit, refit=True, held_out=other)
    assert [n for n, _ in held] == [n for n, _ in inside]
    costs = [c for _, c in held]
    assert all(b >= a for a, b in zip(costs, costs[1:]))
    middle = len(held) // 2  # per token, the held-out error is the larger
    assert held[middle][1] / 400 > 2 * inside[middle][1] / 40


def test_rising_keeps_each_cost_at_least_the_one_before():
    assert rising([(1, 0.5), (2, 0.25), (3, 0.75)]) == [(1, 0.5), (2, 0.5), (3, 0.75)]


def test_costs_keep_their_ridges_through_json_and_a_survey_without_them_has_none():
    costs = BlockCosts(COSTS.heads, COSTS.neurons, COSTS.drop, Ridges(0.001, 0.3))
    assert costs.as_json()["ridges"] == {"heads": 0.001, "neurons": 0.3}
    assert BlockCosts.from_json(costs.as_json()) == costs
    assert BlockCosts.from_json(COSTS.as_json()).ridges is None


def test_grams_hold_their_sample_out_of_the_gram_matrices():
    W, g = random_block(SPEC), torch.Generator().manual_seed(0)
    cos, sin = torch.ones(16, SPEC.head_dim), torch.zeros(16, SPEC.head_dim)
    x = torch.randn(3, 16, SPEC.hidden, generator=g)
    kept, every = Grams(SPEC, torch.Generator().manual_seed(1), per_window=4), Grams(SPEC)
    kept.add(W, x, cos, sin)
    every.add(W, x, cos, sin)
    assert kept.tokens == every.tokens == 48 and kept.fitted == 48 - 12 and every.fitted == 48
    x_out, o, y, a = kept.held_out()
    assert [t.shape[0] for t in (x_out, o, y, a)] == [12] * 4 and a.shape[1] == SPEC.intermediate
    # the Gram of all tokens is the fitted Gram plus the held-out tokens' (weighted activations)
    a = a.to(kept.mlp.dtype)
    assert torch.allclose(kept.mlp + a.T @ a, every.mlp, rtol=1e-4, atol=1e-5)


def test_costs_are_held_out_only_where_tokens_are_few_per_neuron():
    wide, narrow = SPEC.__class__(**{**SPEC.__dict__, "intermediate": 4864}), SPEC
    assert held_out_survey([wide, narrow], 32 * 256)  # Qwen2.5-Coder-0.5B at 32 x 256: 1.7 per neuron
    assert not held_out_survey([SPEC.__class__(**{**SPEC.__dict__, "intermediate": 1536})], 64 * 256)  # SmolLM2
    assert held_out_survey([narrow], TOKENS_PER_NEURON * narrow.intermediate - 1)
    assert not held_out_survey([narrow], TOKENS_PER_NEURON * narrow.intermediate)


def test_in_sample_costs_keep_the_sample_in_the_grams_and_the_fixed_ridge():
    W, g = random_block(SPEC), torch.Generator().manual_seed(0)
    cos, sin = torch.ones(16, SPEC.head_dim), torch.zeros(16, SPEC.head_dim)
    xs = [torch.randn(2, 16, SPEC.hidden, generator=g) for _ in range(2)]
    calib = Calibration(lambda: iter(xs), cos, sin, torch.Generator().manual_seed(1), samples=4)
    cuts: dict = {}
    inside = block_costs(W, SPEC, calib, True, lambda s, y: None, cuts, held_out=False)
    assert inside.ridges is None and set(cuts) == {"o", "down"}  # (the reference cuts, zeroed)
    held = block_costs(W, SPEC, calib, True, lambda s, y: None, held_out=True)
    assert held.ridges is not None and held.neurons != inside.neurons
    kept = Grams(SPEC, torch.Generator().manual_seed(1), per_window=4, hold_out=False)
    kept.add(W, xs[0], cos, sin)
    assert kept.fitted == kept.tokens == 32 and len(kept.held_out()[0]) == 8


def test_the_layout_that_keeps_every_head_costs_nothing_and_is_not_measured(monkeypatch):
    """Its cut removes nothing, so its cost is 0 without running the MLP on the sample (one layout
    fewer to measure: 1/9 of the survey's head layouts on SmolLM2, 1/14 on Qwen2.5-Coder-0.5B)."""
    from streamprune.pruning import costs as costs_module
    real, calls = costs_module.mlp_output, []
    monkeypatch.setattr(costs_module, "mlp_output", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 16, SPEC.hidden, generator=g) for _ in range(3)]
    cos, sin = torch.ones(16, SPEC.head_dim), torch.zeros(16, SPEC.head_dim)
    c = block_costs(random_block(SPEC), SPEC, Calibration(lambda: iter(xs), cos, sin, None), True, lambda s, y: None,
                    held_out=False)
    assert c.heads[(SPEC.n_kv, SPEC.group)] == 0.0 and len(c.heads) == SPEC.n_kv * SPEC.group
    assert len(calls) == SPEC.n_kv * SPEC.group - 1 and all(v > 0 for k, v in c.heads.items()
                                                            if k != (SPEC.n_kv, SPEC.group))
