"""Scorers on synthetic blocks where the answer is known: the perturbative regression recovers
planted importances, its masks are valid GQA cuts, greedy OBS removes what compensation can make
up for, and scoring is deterministic under a seed (compensation: test_compensate.py)."""

import pytest
import torch

from streamprune import config
from streamprune.arch.spec import BlockSpec
from streamprune.pruning.block import attention_heads, attention_output, mlp_activations, rms_norm
from streamprune.pruning.scoring import SCORERS, ScoringOptions, make_scorer
from streamprune.pruning.scoring.obs import greedy_removal_scores
from streamprune.pruning.scoring.perturb import fit_removal_costs, sample_masks
from streamprune.pruning.selection import Sizes, uniform_sizes
from tests.models import block_calibration, random_block

SPEC = BlockSpec(hidden=32, n_heads=8, n_kv=4, head_dim=4, intermediate=48, eps=1e-5)
T = 16


def calibration(seed=0, samples=8, spec=SPEC):
    return block_calibration(spec, seed, samples, T)


WIDE = BlockSpec(hidden=96, n_heads=8, n_kv=4, head_dim=4, intermediate=48, eps=1e-5)


def planted_block(strong_heads, strong_neurons, weak_neurons, seed=0):
    """A block whose units do not interact at their sublayer: heads write to orthogonal subspaces,
    neurons along orthogonal directions, so a unit's removal cost is additive and known. Some
    units are scaled up (they matter), others down to ~0 (they do not)."""
    spec, g = WIDE, torch.Generator().manual_seed(seed)
    W = random_block(spec, seed)
    basis = torch.linalg.qr(torch.randn(spec.hidden, spec.hidden, generator=g))[0]
    head_scale = torch.ones(spec.n_heads)
    head_scale[strong_heads] = 4
    W["o"] = basis[:, :32] * head_scale.repeat_interleave(spec.head_dim)
    neuron_scale = 0.5 + torch.rand(spec.intermediate, generator=g)
    neuron_scale[strong_neurons], neuron_scale[weak_neurons] = 10, 1e-3
    W["down"] = basis[:, 32:80] * neuron_scale
    return W


def test_regression_recovers_a_planted_linear_model():
    g = torch.Generator().manual_seed(0)
    sizes = Sizes(n_kv=3, group=1, intermediate=30)
    heads, neurons = sample_masks(SPEC, sizes, 400, g)
    removed = 1 - torch.cat([heads, neurons], 1)
    beta_true = torch.rand(removed.shape[1], generator=g)
    errors = 0.3 + removed @ beta_true + 0.01 * torch.randn(400, generator=g)
    beta, fit = fit_removal_costs(removed, errors, prior=torch.zeros_like(beta_true), ridge=1e-3)
    assert torch.corrcoef(torch.stack([beta.float(), beta_true]))[0, 1] > 0.9
    assert fit["fit_r2"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SCORERS))
def test_scorers_find_planted_units(method):
    strong_heads, strong_neurons, weak_neurons = [2, 5], [0, 7, 40], [3, 11, 20, 33]
    W = planted_block(strong_heads, strong_neurons, weak_neurons)
    scores = make_scorer(method, ScoringOptions(sizes=uniform_sizes(WIDE, 0.4))).score(W, WIDE, calibration(spec=WIDE))
    top_heads = set(scores.heads.argsort(descending=True)[:2].tolist())
    assert top_heads == set(strong_heads)
    order = scores.neurons.argsort(descending=True).tolist()
    assert set(order[:3]) == set(strong_neurons)
    assert set(order[-4:]) == set(weak_neurons)


def test_perturb_recovers_the_known_removal_costs_of_neurons():
    """With orthogonal neuron directions and unrelated activations the cost of removing neuron i
    from the MLP output is about scale_i^2 * sum_t a_ti^2, refit or not; perturb must rank
    neurons like that."""
    W, calib = planted_block([2, 5], [0, 7, 40], [3, 11, 20, 33]), calibration(spec=WIDE)
    scores = make_scorer("perturb", ScoringOptions(sizes=uniform_sizes(WIDE, 0.4))).score(W, WIDE, calib)
    a = torch.cat([mlp_activations(W, rms_norm(x + attention_output(W, attention_heads(W, WIDE, x, calib.cos,
                                                                                       calib.sin)),
                                                 W["mlp_norm"], WIDE.eps)).flatten(0, 1) for x in calib.batches()])
    truth = a.pow(2).sum(0) * W["down"].pow(2).sum(0)

    def rank(v):
        return v.argsort().argsort().double()

    assert torch.corrcoef(torch.stack([rank(scores.neurons), rank(truth)]))[0, 1] > 0.9


def test_obs_removes_a_duplicated_neuron_first():
    """Neurons 4 and 5 have the same activations and the largest weights: alone, each matters
    most, but once the other absorbs its weights (what compensation does) one of them is free."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 6, generator=g)
    A[:, 5] = A[:, 4]
    W_down = torch.randn(16, 6, generator=g) * torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0, 5.0])
    scores = greedy_removal_scores(A.T.double() @ A.double(), W_down, n_remove=2, chunks=2)
    assert scores.argsort()[0].item() in (4, 5)
    assert set(scores.argsort()[:2].tolist()) != {4, 5}  # the twin that absorbed it stays


def test_perturb_masks_are_valid_gqa_cuts():
    sizes = Sizes(n_kv=3, group=1, intermediate=20)
    heads, neurons = sample_masks(SPEC, sizes, 64, torch.Generator().manual_seed(3))
    per_group = heads.view(64, SPEC.n_kv, SPEC.group).sum(2)
    assert ((per_group == 0) | (per_group == sizes.group)).all()
    assert ((per_group > 0).sum(1) == sizes.n_kv).all()
    assert (neurons.sum(1) == sizes.intermediate).all()
    assert len({tuple(m.tolist()) for m in heads}) > 1  # they do vary


def test_perturb_is_deterministic_under_a_seed():
    W, sizes = random_block(SPEC), uniform_sizes(SPEC, 0.3)
    a = make_scorer("perturb", ScoringOptions(sizes=sizes)).score(W, SPEC, calibration(seed=1))
    b = make_scorer("perturb", ScoringOptions(sizes=sizes)).score(W, SPEC, calibration(seed=1))
    assert torch.equal(a.heads, b.heads) and torch.equal(a.neurons, b.neurons)
    c = make_scorer("perturb", ScoringOptions(sizes=sizes)).score(W, SPEC, calibration(seed=2))
    assert not torch.equal(a.neurons, c.neurons)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_obs_compaction_gives_the_same_scores_and_curve(monkeypatch, dtype):
    """The greedy shrinks its inverse Gram to the remaining neurons as it goes (obs.COMPACT): the
    same removals, scores and cost curve as updating the full matrix every step."""
    from streamprune.pruning.scoring import obs
    g = torch.Generator().manual_seed(1)
    A = torch.randn(400, 96, generator=g) @ torch.randn(96, 96, generator=g)
    W_down = torch.randn(24, 96, generator=g)
    runs = []
    for compact in (obs.COMPACT, 0.0):  # 0: never compacts
        monkeypatch.setattr(obs, "COMPACT", compact)
        curve = []
        runs.append((greedy_removal_scores((A.T @ A).to(dtype), W_down, 90, chunks=30, curve=curve), curve))
    (s1, c1), (s0, c0) = runs
    assert torch.equal(s1.argsort()[:90], s0.argsort()[:90])
    torch.testing.assert_close(s1, s0, rtol=1e-4, atol=1e-6)
    assert [n for n, _ in c1] == [n for n, _ in c0]
    torch.testing.assert_close(torch.tensor([c for _, c in c1]), torch.tensor([c for _, c in c0]), rtol=1e-4, atol=0)


def test_the_scorers_table_is_the_configs_methods():
    """config.METHODS (what RunConfig accepts, without importing torch) names exactly the scorers."""
    assert tuple(SCORERS) == config.METHODS
