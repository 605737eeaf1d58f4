"""Measured costs (costs.py) predict the error a cut really causes, and the allocation
(allocation.py) spends the budget where the costs are lowest."""

import itertools

import pytest
import torch

from streamprune.arch.spec import BlockSpec
from streamprune.errors import StreamPruneError
from streamprune.pruning.allocation import allocate, allocate_global, allocate_uniform, linear_params, param_budget
from streamprune.pruning.block import attention_heads, attention_output, mlp_activations, rms_norm
from streamprune.pruning.costs import BlockCosts, Grams, block_costs, columns, refit_columns, removal_cost, with_ridge
from streamprune.pruning.numerics import invert_spd, token_scale
from streamprune.pruning.scoring import Calibration
from streamprune.pruning.selection import Sizes, attention_params, kept_params
from tests.models import SPEC, fake_costs, random_block


def calib(n=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, SPEC.hidden, generator=g) for _ in range(n)]


def rotary(T=16):
    return torch.ones(T, SPEC.head_dim), torch.zeros(T, SPEC.head_dim)


def costs_of(W, xs, refit=True):
    cos, sin = rotary()
    return block_costs(W, SPEC, Calibration(lambda: iter(xs), cos, sin, None), refit, lambda s, y: None)


def weighted_refit_error(A: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, s: torch.Tensor) -> float:
    """min over W' of sum_t s_t^2 |W A_t - W'[:, keep] A_t[keep]|^2 (exact least squares, fp64)."""
    A, s = A.double(), s.double()[:, None]
    Y = (A * s) @ W.double().T
    Ak = (A * s)[:, keep]
    sol = torch.linalg.lstsq(Ak, Y, driver="gelsd").solution
    return (Y - Ak @ sol).pow(2).sum().item()


@pytest.mark.slow
def test_head_costs_are_the_error_left_after_refitting_o_proj():
    W, xs = random_block(SPEC), calib()
    cos, sin = rotary()
    grams = Grams(SPEC)
    heads, scales = [], []
    for x in xs:
        grams.add(W, x, cos, sin)
        o = attention_heads(W, SPEC, x, cos, sin)
        h = x + attention_output(W, o)
        y = h + torch.nn.functional.linear(mlp_activations(W, rms_norm(h, W["mlp_norm"], SPEC.eps)), W["down"])
        heads.append(o.reshape(-1, SPEC.n_heads * SPEC.head_dim))
        scales.append(token_scale(y).reshape(-1))
    A, s = torch.cat(heads), torch.cat(scales)
    Hinv = invert_spd(with_ridge(grams.heads))
    exact = {}
    for choice in itertools.product((0, 1), repeat=4):  # every layout keeping one head in each of the 4 groups
        removed = torch.tensor([2 * g + 1 - k for g, k in enumerate(choice)])
        keep = torch.tensor([c for h in range(8) if h not in removed for c in range(4 * h, 4 * h + 4)])
        exact[choice] = weighted_refit_error(A, W["o"], keep, s)
        # OBS on the Gram matrix gives the least-squares refit's error (up to the ridge)
        assert removal_cost(W["o"], grams.heads, Hinv, columns(removed, 4)) == pytest.approx(exact[choice], rel=0.1)
    # the OBS refit of o_proj is the least-squares refit (up to the ridge)
    removed = torch.tensor([1, 3, 5, 7])
    keep = torch.tensor([c for h in (0, 2, 4, 6) for c in range(4 * h, 4 * h + 4)])
    W_new = refit_columns(W["o"], Hinv, columns(removed, 4))
    As = A.double() * s.double()[:, None]
    error = (As @ W["o"].double().T - As[:, keep] @ W_new[:, keep].double().T).pow(2).sum().item()
    assert error == pytest.approx(weighted_refit_error(A, W["o"], keep, s), rel=0.1)
    assert W_new[:, columns(removed, 4)].abs().max() == 0


@pytest.mark.slow
def test_costs_grow_as_more_is_removed_and_dropping_costs_the_update():
    costs = costs_of(random_block(SPEC), calib())
    curve = [c for _, c in costs.neurons]
    assert curve[0] == 0 and all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    assert costs.heads[(1, 1)] >= costs.heads[(2, 1)] >= costs.heads[(4, 1)] >= costs.heads[(4, 2)] == 0
    assert costs.drop > 0
    no_refit = costs_of(random_block(SPEC), calib(), refit=False)
    assert no_refit.mlp(24) > 0 and costs.mlp(48) == 0


def test_global_allocation_cuts_the_cheap_blocks_and_keeps_the_budget():
    blocks = (SPEC,) * 4
    costs = [fake_costs(s) for s in (10.0, 1.0, 10.0, 10.0)]
    sizes = allocate_global(blocks, costs, 0.3)
    kept = [linear_params(b, s) for b, s in zip(blocks, sizes)]
    assert sum(kept) <= param_budget(blocks, 0.3)
    assert sum(kept) >= param_budget(blocks, 0.3) - 3 * SPEC.hidden * 6  # the budget is spent, to a neuron step
    assert kept[1] == min(kept)  # the cheap block gives the most


def test_global_allocation_drops_a_block_that_costs_nothing():
    blocks = (SPEC,) * 3
    costs = [fake_costs(5.0), BlockCosts(fake_costs(5.0).heads, fake_costs(5.0).neurons, drop=0.0), fake_costs(5.0)]
    sizes = allocate_global(blocks, costs, 0.3)
    assert sizes[1] is None and all(s is not None for s in (sizes[0], sizes[2]))
    kept = allocate_global(blocks, costs, 0.3, allow_drop=False)
    assert kept[1] is not None  # not dropped, and the budget is still met by cutting every block
    for chosen in (sizes, kept):
        assert sum(linear_params(b, s) for b, s in zip(blocks, chosen)) <= param_budget(blocks, 0.3)


def test_uniform_allocation_is_one_shape_within_the_budget():
    blocks = (SPEC,) * 3
    sizes = allocate_uniform(blocks, [fake_costs(1.0), fake_costs(2.0), fake_costs(3.0)], 0.4)
    assert len(set(sizes)) == 1 and isinstance(sizes[0], Sizes)
    assert sum(linear_params(b, s) for b, s in zip(blocks, sizes)) <= param_budget(blocks, 0.4)


def test_budgets_are_whole_parameters_rounded_not_floored():
    wide = BlockSpec(hidden=64, n_heads=8, n_kv=4, head_dim=8, intermediate=8960, eps=1e-5)
    mlp = wide.mlp_params()  # 3 * 64 * 8960 = 1,720,320; 0.45 of it is 774,144 exactly
    assert (1 - 0.55) * mlp == pytest.approx(774144) and int((1 - 0.55) * mlp) == 774143  # the float's floor
    budget = param_budget((wide,), 0.55)
    assert isinstance(budget, int) and budget == round(0.45 * (mlp + attention_params(wide, 4, 2)))
    assert kept_params(mlp, 0.55) == 774144


def test_a_cost_that_is_not_a_number_is_refused_naming_its_block():
    blocks = (SPEC,) * 3
    bad = fake_costs(1.0)
    for broken in (BlockCosts({**bad.heads, (2, 1): float("nan")}, bad.neurons, bad.drop),
                   BlockCosts(bad.heads, bad.neurons[:2] + [(36, float("inf"))], bad.drop),
                   BlockCosts(bad.heads, bad.neurons, float("nan"))):
        for allocation in ("global", "uniform"):
            with pytest.raises(StreamPruneError, match="cost of block 1 that is not a number"):
                allocate(allocation, blocks, [fake_costs(1.0), broken, fake_costs(2.0)], 0.3)


def test_a_budget_no_shape_meets_is_refused_not_exceeded():
    blocks = (SPEC,) * 2
    costs = [fake_costs(1.0), fake_costs(2.0)]
    # the least a kept block holds (1 KV group of 1 head, one neuron) is 0.07 of its weights
    with pytest.raises(StreamPruneError, match="no shapes fit --sparsity 0.99"):
        allocate_global(blocks, costs, 0.99, allow_drop=False)
    with pytest.raises(StreamPruneError, match="no shape of one block fits --sparsity 0.99"):
        allocate_uniform(blocks, costs, 0.99)
    dropped = allocate_global(blocks, costs, 0.99)  # dropping blocks meets it
    assert sum(linear_params(b, s) for b, s in zip(blocks, dropped)) <= param_budget(blocks, 0.99)
