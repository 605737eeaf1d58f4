"""vLLM serves streamprune's outputs: per-block outputs name a class that only streamprune's vLLM
plugin registers (so stock loaders refuse them by name), and in vLLM (the CPU build, in its own
virtual environment: tests/vllm_env.py) they compute what streamprune.load_pretrained computes, the
same greedy tokens and log-probabilities, for every family: Llama (kjv-llama's default output, and a
Llama whose head counts vary, written as Mistral), Qwen2 (q/k/v biases, heads lost, a block dropped),
Qwen3 (q/k norms, KV heads varying per block), and a uniform Qwen2 that lost heads (vLLM's own Qwen2
cannot hold it)."""

from __future__ import annotations

import ast
import json
import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from streamprune import load_pretrained
from streamprune.arch.families import FAMILIES
from streamprune.arch.output_config import heterogeneous_config, pruned_config
from streamprune.inputs.calibration import load_tokenizer
from streamprune.output import vllm_plugin
from tests.harness import invoke
from tests.models import SHARED, TINYSTORIES, save_tiny_model
from tests.vllm_env import REQUIRED, Unavailable, install_streamprune, run_vllm, vllm_python

KJV = SHARED / "models" / "kjv-llama-6.8m"
PLUGIN_MODELS = Path(vllm_plugin.__file__).with_name("vllm_models.py")


def test_the_plugin_registers_a_class_for_every_family():
    classes = {n.name for n in ast.parse(PLUGIN_MODELS.read_text()).body if isinstance(n, ast.ClassDef)}
    registered = vllm_plugin.architectures()
    assert set(registered) == {f.per_block_architecture for f in FAMILIES.values()}
    for name, where in registered.items():
        assert where == f"streamprune.output.vllm_models:{name}" and name in classes


def test_vllm_finds_the_plugin_through_its_entry_point():
    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "streamprune"]
    assert plugin.load() is vllm_plugin.register


def test_only_outputs_that_need_the_plugin_name_its_classes():
    config = json.loads((TINYSTORIES / "stories260K" / "config.json").read_text())  # Llama, 8 heads
    block = {"n_heads": 8, "n_kv": 4, "intermediate": 172}
    assert pruned_config(config, 8, 4, 100)["architectures"] == ["LlamaForCausalLM"]
    assert pruned_config(config, 6, 3, 100)["architectures"] == ["MistralForCausalLM"]
    assert heterogeneous_config(config, [block, None, block, block, block])["architectures"] == ["LlamaForCausalLM"]
    shapes = [block, dict(block, intermediate=100), block, block, block]
    assert heterogeneous_config(config, shapes)["architectures"] == ["StreamPruneLlamaForCausalLM"]
    shapes[0] = dict(block, n_heads=4, n_kv=2)
    assert heterogeneous_config(config, shapes)["architectures"] == ["StreamPruneMistralForCausalLM"]
    qwen2 = dict(config, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    # vLLM's own Qwen2 takes head_dim as hidden_size / heads: a uniform Qwen2 that lost heads needs the plugin
    assert pruned_config(qwen2, 8, 4, 100)["architectures"] == ["Qwen2ForCausalLM"]
    assert pruned_config(qwen2, 4, 2, 100)["architectures"] == ["StreamPruneQwen2ForCausalLM"]


# ---- in vLLM itself ----

def lopsided_model(folder: Path, family: str, weak: str) -> Path:
    """A random model (head_dim 32, as vLLM's CPU attention needs) with confident predictions, in
    which a pruning run finds block 2 useless (it is dropped) and, in block 1, either one KV group
    (`weak="kv"`: that block keeps fewer KV heads) or one query head of each group (`weak="heads"`)."""
    from transformers import AutoModelForCausalLM
    extra = {"sliding_window": None} if family == "mistral" else {}
    save_tiny_model(folder, family, layers=4, hidden=128, heads=4, kv=2, intermediate=256, vocab=512,
                    tokenizer_from=TINYSTORIES / "stories260K", **extra)
    model = AutoModelForCausalLM.from_pretrained(folder)
    D = 32
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        useless = model.model.layers[2]
        useless.self_attn.o_proj.weight.mul_(1e-3)
        useless.mlp.down_proj.weight.mul_(1e-3)
        o = model.model.layers[1].self_attn.o_proj.weight
        columns = [slice(2 * D, 4 * D)] if weak == "kv" else [slice(D, 2 * D), slice(3 * D, 4 * D)]
        for c in columns:
            o[:, c].mul_(1e-3)
    model.save_pretrained(folder, max_shard_size="200KB")
    return folder


def prune(model: Path, out: Path, *extra, text: Path = TINYSTORIES / "calib.txt", samples=8, seq_len=64) -> Path:
    r = invoke("run", "--shards", model, "--out", out, "--calib", text, "--samples", samples, "--seq-len", seq_len,
               "--quiet", *extra)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """(vLLM's Python, a folder holding this checkout installed beside it), or the test says why not."""
    try:
        python = vllm_python()
        return python, install_streamprune(python, tmp_path_factory.mktemp("vllm-install"))
    except Unavailable as e:
        if os.environ.get(REQUIRED):
            pytest.fail(f"vLLM is required here ({REQUIRED}) and {e}")
        pytest.skip(f"vLLM cannot run on this machine: {e}")


def outputs(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (a default-run output, or uniform where named so; the text its prompt comes from)."""
    demo_text = TINYSTORIES / "eval.txt"
    out = {}
    if KJV.is_dir():
        kjv_text = SHARED / "data" / "kjv"
        out["kjv-llama default"] = (prune(KJV, tmp / "kjv", "--sparsity", 0.3, text=kjv_text / "calib.txt",
                                          samples=16, seq_len=128), kjv_text / "eval.txt")
    for family, weak in (("llama", "kv"), ("qwen2", "heads"), ("qwen3", "kv")):
        dense = lopsided_model(tmp / family, family, weak)
        out[f"{family} default"] = (prune(dense, tmp / f"{family}-global", "--sparsity", 0.4), demo_text)
    out["qwen2 uniform"] = (prune(tmp / "qwen2", tmp / "qwen2-uniform", "--sparsity", 0.5, "--allocation", "uniform"),
                            demo_text)
    return out


@pytest.mark.slow
def test_vllm_computes_what_load_pretrained_computes(vllm, tmp_path):
    python, site = vllm
    models = outputs(tmp_path)
    configs = {name: json.loads((folder / "config.json").read_text()) for name, (folder, _) in models.items()}
    # what the runs made: blocks of different shapes, heads and KV heads lost, blocks dropped
    assert configs["llama default"]["architectures"] == ["StreamPruneMistralForCausalLM"]
    assert any("num_key_value_heads" in c for c in configs["qwen3 default"]["per_layer_config"].values())
    assert any("num_attention_heads" in c for c in configs["qwen2 default"]["per_layer_config"].values())
    assert all(configs[f"{f} default"]["num_hidden_layers"] == 3 for f in ("llama", "qwen2", "qwen3"))
    uniform = configs["qwen2 uniform"]
    assert "per_layer_config" not in uniform and uniform["num_attention_heads"] * 32 < uniform["hidden_size"]
    prompts = {name: load_tokenizer(folder)(text.read_text()[:400]).input_ids[:40]
               for name, (folder, text) in models.items()}
    runs = [{"model": str(folder), "prompts": [prompts[name]], "new_tokens": 12}
            for name, (folder, _) in models.items()]
    for (name, (folder, _)), got in zip(models.items(), run_vllm(python, site, runs)):
        assert got["architecture"] == configs[name]["architectures"][0], name
        model = load_pretrained(folder, dtype=torch.float32)
        ids = torch.tensor([prompts[name]])
        with torch.no_grad():
            logprobs = model(ids).logits.log_softmax(-1)
            want = logprobs[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            greedy = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids),
                                    output_scores=True, return_dict_in_generate=True)
        result = got["results"][0]
        assert (torch.tensor(result["prompt_logprobs"]) - want).abs().max() < 2e-3, name
        tokens = greedy.sequences[0, ids.shape[1]:].tolist()
        assert result["tokens"] == tokens, name
        scores = torch.stack(greedy.scores)[:, 0].log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert (torch.tensor(result["logprobs"]) - scores).abs().max() < 2e-3, name
