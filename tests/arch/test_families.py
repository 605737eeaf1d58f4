"""families.py and output_config.py: the FAMILIES table, and nothing else, decides what
architecture() reads from a config (q/k norms, biases, sliding windows), which sublayers can
carry a bias, and how a pruned config is written (a Llama whose head count LlamaConfig refuses
becomes the Mistral it computes; bias keys switched on; no auto_map)."""

import copy

import pytest

from streamprune.arch.families import FAMILIES, architecture, bias_sublayers, family
from streamprune.arch.output_config import pruned_config
from streamprune.errors import StreamPruneError
from tests.models import tiny_config

HIDDEN, HEADS, KV, HEAD_DIM, INTER = 64, 8, 2, 8, 96  # tiny_config's defaults


def config(name: str, layers: int = 2, **extra) -> dict:
    return tiny_config(name, layers=layers, **extra).to_dict()


def test_family_is_looked_up_by_model_type():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3"}
    for name, fam in FAMILIES.items():
        assert family({"model_type": name}) is fam and fam.module == name
    for bad in ({"model_type": "gpt2"}, {}, {"model_type": ["llama"]}):
        with pytest.raises(StreamPruneError, match="unsupported model_type .*supported: llama, mistral, qwen2, qwen3"):
            family(bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_table_decides_norms_and_biases(name):
    fam, arch = FAMILIES[name], architecture(config(name))
    assert arch.model_type == name and arch.n_layers == 2 and arch.hidden == HIDDEN
    for b in arch.blocks:
        assert (b.n_heads, b.n_kv, b.head_dim, b.intermediate) == (HEADS, KV, HEAD_DIM, INTER)
        assert b.qk_norm == fam.qk_norm == (name == "qwen3")
        assert b.qkv_bias == fam.qkv_bias == (name == "qwen2")
        assert not b.o_bias and not b.mlp_bias
        assert ("q_norm" in b.tensor_names()) == b.qk_norm and ("q_bias" in b.tensor_names()) == b.qkv_bias
    assert bias_sublayers(config(name)) == frozenset()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_attention_bias_gives_an_o_bias_where_the_family_has_one(name):
    b = architecture(config(name, attention_bias=True)).blocks[0]
    assert b.qkv_bias and b.o_bias and not b.mlp_bias
    assert {"q_bias", "k_bias", "v_bias", "o_bias"} <= set(b.tensor_names())
    assert bias_sublayers(config(name, attention_bias=True)) == {"attention"}


def test_qwen2_has_qkv_biases_but_never_an_o_bias():
    b = architecture(config("qwen2")).blocks[0]
    assert b.qkv_bias and not b.o_bias and "o_bias" not in b.tensor_names()


def test_llama_mlp_bias():
    cfg = config("llama", attention_bias=True, mlp_bias=True)
    b = architecture(cfg).blocks[0]
    assert b.mlp_bias and {"gate_bias", "up_bias", "down_bias"} <= set(b.tensor_names())
    assert bias_sublayers(cfg) == {"attention", "mlp"}
    assert bias_sublayers(config("llama", mlp_bias=True)) == {"mlp"}


@pytest.mark.parametrize("name,key", [("mistral", "attention_bias"), ("qwen3", "mlp_bias"), ("mistral", "mlp_bias")])
def test_bias_keys_the_family_ignores_add_no_bias(name, key):
    assert architecture(config(name, **{key: True})).blocks[0] == architecture(config(name)).blocks[0]


def test_sliding_window_on_every_mistral_layer():
    assert [b.sliding_window for b in architecture(config("mistral", layers=3)).blocks] == [16, 16, 16]
    assert all(b.sliding_window is None for b in architecture(config("llama", layers=3)).blocks)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_sliding_window_per_layer_types(name):
    explicit = config(name, layers=3, use_sliding_window=True, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert [b.sliding_window for b in architecture(explicit).blocks] == [8, None, 8]
    derived = config(name, layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert derived["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert [b.sliding_window for b in architecture(derived).blocks] == [None, 8, 8]
    assert all(b.sliding_window is None for b in architecture(config(name, layers=3)).blocks)  # off by default


def test_layer_types_of_the_wrong_length_are_refused():
    cfg = config("qwen2", layers=3)
    cfg["layer_types"] = ["full_attention"] * 2
    with pytest.raises(StreamPruneError):  # transformers or streamprune: either way one clear error
        architecture(cfg)


def test_pruned_llama_with_an_indivisible_head_count_is_written_as_mistral():
    cfg = config("llama")
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    before = copy.deepcopy(cfg)
    out = pruned_config(cfg, 6, 2, 50)
    assert cfg == before  # the input's config is not changed
    assert out["model_type"] == "mistral" and out["architectures"] == ["MistralForCausalLM"]
    assert out["sliding_window"] is None and out["head_dim"] == HEAD_DIM
    assert not {"auto_map", "attention_bias", "mlp_bias", "pretraining_tp"} & set(out)
    b = architecture(out).blocks[0]
    assert (b.n_heads, b.n_kv, b.head_dim, b.intermediate, b.sliding_window) == (6, 2, HEAD_DIM, 50, None)
    assert out["rope_parameters"] == cfg["rope_parameters"]  # the same rotary (llama3 scaling)


def test_pruned_llama_with_a_divisible_head_count_stays_llama():
    out = pruned_config(config("llama"), 4, 2, 50)
    assert out["model_type"] == "llama" and "auto_map" not in out
    b = architecture(out).blocks[0]
    assert (b.n_heads, b.n_kv, b.head_dim, b.intermediate) == (4, 2, HEAD_DIM, 50)


@pytest.mark.parametrize("name,asked,switched", [
    ("llama", {"attention"}, {"attention"}),
    ("llama", {"mlp"}, {"mlp"}),
    ("llama", {"attention", "mlp"}, {"attention", "mlp"}),
    ("qwen3", {"attention", "mlp"}, {"attention"}),  # Qwen3's MLP has no bias key
    ("qwen2", {"attention", "mlp"}, set()),
    ("mistral", {"attention", "mlp"}, set()),
])
def test_pruned_config_switches_on_the_bias_keys_asked_for(name, asked, switched):
    out = pruned_config(config(name), 4, 2, 50, biases=asked)
    keys = {"attention": "attention_bias", "mlp": "mlp_bias"}
    assert {s for s in keys if out.get(keys[s])} == switched
    assert bias_sublayers(out) == switched
    b = architecture(out).blocks[0]
    assert b.o_bias == ("attention" in switched) and b.mlp_bias == ("mlp" in switched)


def test_a_biased_llama_with_an_indivisible_head_count_is_refused():
    with pytest.raises(StreamPruneError, match="no stock equivalent"):
        pruned_config(config("llama", attention_bias=True), 6, 2, 50)
