"""--multiple-of N: every allocation keeps query heads and neurons multiples of N and KV heads a
multiple or divisor of N (what vLLM's tensor parallelism splits), refuses a model that cannot,
and leaves the default (N = 1) as it was."""

import json
from pathlib import Path

import pytest

from streamprune import load_pretrained
from streamprune.arch.families import architecture
from streamprune.arch.spec import BlockSpec
from streamprune.checks.validate import check_sparsity
from streamprune.config import RunConfig
from streamprune.engine import pipeline
from streamprune.errors import StreamPruneError
from streamprune.pruning.allocation import allocate_global, allocate_uniform, linear_params, param_budget
from streamprune.pruning.selection import head_layouts, tensor_parallel_ok, uniform_sizes
from tests.models import SPEC, fake_costs, save_tiny_model, tiny_config

DEMO = Path(__file__).resolve().parents[2] / "demo"


def splits(n_heads: int, n_kv: int, intermediate: int, gpus: int) -> bool:
    """vLLM's rule: heads divide evenly; KV heads divide evenly or are replicated; neurons divide."""
    kv_ok = n_kv % gpus == 0 if n_kv >= gpus else gpus % n_kv == 0
    return n_heads % gpus == 0 and kv_ok and intermediate % gpus == 0


def test_the_issues_42_heads_and_7_kv_heads_do_not_split_and_replicated_kv_heads_do():
    assert not any(tensor_parallel_ok(7, 6, n) for n in (2, 4, 8))
    assert tensor_parallel_ok(2, 4, 8) and tensor_parallel_ok(8, 1, 8) and tensor_parallel_ok(16, 2, 8)
    assert not tensor_parallel_ok(3, 8, 8)  # 24 heads split 8 ways, but 3 KV heads cannot be replicated to 8
    assert head_layouts(SPEC, 4) == [(2, 2), (4, 1), (4, 2)]  # 8 heads in 4 groups of 2


# uniform_sizes(SPEC, sparsity) without --multiple-of, worked out by hand: the GQA layout closest to
# 1 - sparsity, then the most neurons within the budget (SPEC's MLP is small, so its neuron step is
# 1). At 30% the block keeps 5,376 of 7,680 weights: 2,048 in the (4, 1) attention, and 3,328 / 96 =
# 34.7 neurons, so 34 (35 was over the budget), which 4 GPUs cannot split.
DEFAULT_SIZES = {0.0: (4, 2, 48), 0.1: (4, 2, 40), 0.3: (4, 1, 34), 0.5: (2, 2, 24)}


@pytest.mark.parametrize("sparsity", sorted(DEFAULT_SIZES))
def test_fixed_rule_keeps_multiples(sparsity):
    sizes = uniform_sizes(SPEC, sparsity, multiple_of=4)
    assert splits(sizes.n_heads, sizes.n_kv, sizes.intermediate, 4)
    default = uniform_sizes(SPEC, sparsity)
    assert (default.n_kv, default.group, default.intermediate) == DEFAULT_SIZES[sparsity]
    assert sizes.intermediate % 4 == 0 and abs(sizes.intermediate - default.intermediate) < 4
    assert (sizes.n_kv, sizes.group) == (default.n_kv, default.group)  # SPEC's layouts already split 4 ways
    if sparsity:  # the default spends the budget to within a neuron's weights, never more
        target = param_budget((SPEC,), sparsity)
        assert 0 <= target - linear_params(SPEC, default) < 3 * SPEC.hidden


def test_the_default_does_not_round_neurons_and_multiple_of_does():
    assert uniform_sizes(SPEC, 0.3).intermediate == 34
    assert uniform_sizes(SPEC, 0.3, multiple_of=4).intermediate == 32
    assert uniform_sizes(SPEC, 0.3, multiple_of=2).intermediate == 34


@pytest.mark.parametrize("multiple_of", [2, 4, 8])
def test_measured_allocations_keep_multiples_within_the_budget(multiple_of):
    blocks = (SPEC,) * 4
    costs = [fake_costs(s) for s in (10.0, 1.0, 10.0, 3.0)]
    for sizes in (allocate_global(blocks, costs, 0.3, multiple_of=multiple_of),
                  allocate_uniform(blocks, costs, 0.3, multiple_of=multiple_of)):
        kept = [s for s in sizes if s is not None]
        assert kept and all(splits(s.n_heads, s.n_kv, s.intermediate, multiple_of) for s in kept)
        assert sum(linear_params(b, s) for b, s in zip(blocks, sizes)) <= param_budget(blocks, 0.3)


def test_a_model_that_cannot_be_split_is_refused_in_one_sentence():
    arch = architecture(tiny_config("llama", heads=4, kv=2, hidden=32).to_dict())
    with pytest.raises(StreamPruneError, match=r"--multiple-of 8: block 0 has 4 query heads in 2 KV groups"):
        check_sparsity(arch, 0.3, multiple_of=8)
    check_sparsity(arch, 0.3, multiple_of=4)
    with pytest.raises(StreamPruneError, match=r"allows at most .* with --multiple-of 4"):
        check_sparsity(arch, 0.9, multiple_of=4)
    wide = BlockSpec(hidden=32, n_heads=8, n_kv=8, head_dim=4, intermediate=6, eps=1e-5)
    assert uniform_sizes(wide, 0.3, multiple_of=4).intermediate == 4  # 6 neurons round down to 4


@pytest.mark.slow
@pytest.mark.parametrize("allocation", ["global", "rule"])
def test_pruned_output_splits_four_ways_and_loads(tmp_path, allocation):
    src = save_tiny_model(tmp_path / "in", "llama", layers=3, vocab=512, heads=8, kv=4,
                          tokenizer_from=DEMO / "stories260K")
    cfg = RunConfig(shards=src, out=tmp_path / "out", sparsity=0.4, calib=DEMO / "calib.txt", samples=4, seq_len=32,
                    progress=False, allocation=allocation, multiple_of=4, row_multiple=1)
    report = pipeline.run(cfg)  # (--row-multiple 1: rows of 32 would leave this tiny model 4 heads, 64 neurons)
    assert report["arguments"]["multiple_of"] == 4
    assert report["block_params"]["removed_fraction"] == pytest.approx(0.4, abs=0.05)
    for b in report["blocks"]:
        if not b.get("dropped"):
            assert splits(b["heads"][1], b["kv_heads"][1], b["neurons"][1], 4), b
    model = load_pretrained(cfg.out)
    config = json.loads((cfg.out / "config.json").read_text())
    layers = model.model.layers
    assert len(layers) == config["num_hidden_layers"]
    for layer in layers:
        attn = layer.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        kv = attn.k_proj.out_features // attn.head_dim
        assert splits(heads, kv, layer.mlp.gate_proj.out_features, 4)
