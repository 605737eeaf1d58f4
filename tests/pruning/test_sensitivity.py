"""sensitivity.py: the probe tokens, the probes a block starts, the KL over the dense model's top
tokens, and how the measured sensitivities weigh a block's costs."""

import pytest
import torch

from streamprune.pruning.block import block_forward
from streamprune.pruning.costs import BlockCosts
from streamprune.pruning.sensitivity import (
    PROBE_POSITIONS,
    PROBE_TOKENS,
    TOP,
    local_cost,
    probe_shape,
    sensitivities,
    start_probes,
    stream_count,
    through,
    top_kl,
    top_logits,
    top_tokens,
    weigh,
)
from tests.models import SPEC, random_block


def test_probe_tokens_are_the_first_positions_of_the_first_windows():
    assert probe_shape(32, 256) == (PROBE_TOKENS // 256, 256)
    assert probe_shape(128, 2048) == (PROBE_TOKENS // PROBE_POSITIONS, PROBE_POSITIONS)
    assert probe_shape(1, 64) == (1, 64)  # never more windows than the run has
    assert stream_count(24) == 49


def test_local_cost_is_the_surveys_weighted_error_per_element():
    y = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    assert local_cost(y, y) == 0
    cut = y + torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert local_cost(y, cut) == pytest.approx(1 / 1.0 / 4)  # token 0: error 1, mean(y^2) 1; 4 elements


def test_a_block_starts_two_probes_and_runs_every_stream_dense():
    W, g = random_block(SPEC), torch.Generator().manual_seed(0)
    cos, sin = torch.ones(8, SPEC.head_dim), torch.zeros(8, SPEC.head_dim)
    streams = torch.randn(3, 2, 8, SPEC.hidden, generator=g)
    after = through(W, SPEC, streams, cos, sin)
    assert torch.allclose(after[1], block_forward(W, SPEC, streams[1], cos, sin))
    same = {"o": W["o"], "down": W["down"]}  # cuts that remove nothing: probes equal the dense output
    probes, local = start_probes(W, same, SPEC, streams[0], after[0], cos, sin)
    assert probes.shape == (2, 2, 8, SPEC.hidden) and local == [0.0, 0.0]
    half = {"o": W["o"] * (torch.arange(W["o"].shape[1]) % 2),
            "down": W["down"] * (torch.arange(SPEC.intermediate) % 2)}
    probes, local = start_probes(W, half, SPEC, streams[0], after[0], cos, sin)
    assert all(c > 0 for c in local)


def test_top_tokens_are_the_largest_logits_however_the_vocabulary_is_chunked():
    g = torch.Generator().manual_seed(1)
    head, states = torch.randn(300, 16, generator=g), torch.randn(5, 16, generator=g)
    ids = top_tokens(states, lambda lo, hi: head[lo:hi], 300, 7)
    assert ids.shape == (5, TOP)
    assert torch.equal(ids.sort(1).values, (states @ head.T).topk(TOP, 1).indices.sort(1).values)
    union = ids.unique()
    where = torch.searchsorted(union, ids)
    logits = top_logits(states, head[union], where)
    assert torch.allclose(logits, (states @ head.T).gather(1, ids).double(), atol=1e-5)
    assert top_kl(logits, logits) == 0
    other = top_logits(states + 0.1 * torch.randn(5, 16, generator=g), head[union], where)
    assert top_kl(logits, other) > 0


def test_sensitivities_are_kl_per_unit_cost_relative_to_the_median_mlp_one():
    kl = [[4.0, 2.0], [1.0, 1.0], [3.0, 9.0]]
    local = [[1.0, 1.0], [1.0, 0.5], [0.0, 1.0]]  # block 2's head probe changed nothing
    assert sensitivities(kl, local) == [(2.0, 1.0), (0.5, 1.0), (4.5, 4.5)]


def test_weigh_multiplies_each_kind_and_drop_by_the_larger():
    c = BlockCosts({(1, 1): 0.5, (2, 2): 0.0}, [(8, 0.0), (4, 0.25)], drop=1.0)
    (w,) = weigh([c], [(2.0, 4.0)])
    assert w.heads == {(1, 1): 1.0, (2, 2): 0.0} and w.neurons == [(8, 0.0), (4, 1.0)] and w.drop == 4.0
    assert weigh([c], None) == [c]
