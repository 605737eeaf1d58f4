"""Plans are GQA-valid and hit the target; the sliced block equals the masked block."""

import pytest
import torch

from streamprune.arch.families import architecture, read_config, rotary_tables
from streamprune.arch.spec import BlockSpec
from streamprune.pruning.block import block_forward
from streamprune.pruning.selection import attention_params, masks, select_units, uniform_sizes
from streamprune.pruning.slicing import slice_block
from streamprune.store.shards import ShardIndex
from tests.models import save_tiny_model

SPEC = BlockSpec(hidden=8192, n_heads=64, n_kv=8, head_dim=128, intermediate=28672, eps=1e-5)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7])
def test_plan_is_gqa_valid_and_on_target(sparsity):
    sizes = uniform_sizes(SPEC, sparsity)
    assert 1 <= sizes.n_kv <= SPEC.n_kv and 1 <= sizes.group <= SPEC.group
    assert sizes.intermediate % 64 == 0
    full = attention_params(SPEC, SPEC.n_kv, SPEC.group) + 3 * SPEC.hidden * SPEC.intermediate
    kept = attention_params(SPEC, sizes.n_kv, sizes.group) + 3 * SPEC.hidden * sizes.intermediate
    assert abs((1 - kept / full) - sparsity) < 0.01


def test_selection_keeps_best_heads_per_group():
    spec = BlockSpec(hidden=64, n_heads=8, n_kv=4, head_dim=8, intermediate=10, eps=1e-5)
    heads = torch.tensor([1.0, 9.0, 5.0, 4.0, 0.1, 0.2, 8.0, 7.0])
    kept = select_units(heads, torch.arange(10.0), spec, uniform_sizes(spec, 0.0).__class__(2, 1, 3))
    assert kept.kv.tolist() == [0, 3] and kept.heads.tolist() == [1, 6]
    assert kept.neurons.tolist() == [7, 8, 9]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_sliced_block_equals_masked_block(tmp_path, family):
    folder = save_tiny_model(tmp_path / family, family, layers=1)
    spec = architecture(read_config(folder))
    W = ShardIndex.open(folder).load(spec.block_tensors(0))
    b = spec.blocks[0]
    g = torch.Generator().manual_seed(1)
    kept = select_units(torch.rand(b.n_heads, generator=g), torch.rand(b.intermediate, generator=g), b,
                        uniform_sizes(b, 0.5))
    W2, b2 = slice_block(W, b, kept)
    x = torch.randn(2, 24, b.hidden, generator=g)
    cos, sin = rotary_tables(spec.config, 24)
    head_mask, neuron_mask = masks(b, kept)
    masked = block_forward(W, b, x, cos, sin, head_mask, neuron_mask)
    assert (block_forward(W2, b2, x, cos, sin) - masked).abs().max() <= 1e-5
    assert W2["q"].shape[0] == b2.n_heads * b2.head_dim and W2["k"].shape[0] == b2.n_kv * b2.head_dim
