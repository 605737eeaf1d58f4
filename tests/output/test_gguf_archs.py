"""Which llama.cpp architecture a model is exported as: the table of what each holds (one shape or
per-layer shapes, heads tied to the hidden size, biases, q/k norms) decides between the family's own
architecture and deci, or refuses before writing; and the matrix of every family x allocation x
compensation at 50%, pruned, exported and run in llama.cpp (xllamacpp): each output computes what
streamprune's loader computes, or its export was refused cleanly (Qwen3 only: neither llama.cpp's
qwen3 nor deci builds per-block shapes with q/k norms, and its qwen3 loads no o_proj bias)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from streamprune.arch.spec import Architecture, BlockSpec
from streamprune.errors import StreamPruneError
from streamprune.output.gguf_archs import ARCHS, cannot_hold, choose
from tests.harness import invoke, refused
from tests.models import TINYSTORIES, confident_model

BLOCK = BlockSpec(hidden=64, n_heads=8, n_kv=2, head_dim=8, intermediate=96, eps=1e-6)


def model(model_type: str, *blocks: BlockSpec) -> Architecture:
    return Architecture(model_type, len(blocks), 512, 64, False, tuple(blocks), {})


def cut(**change) -> BlockSpec:
    return dataclasses.replace(BLOCK, **change)


QWEN2, QWEN3 = cut(qkv_bias=True), cut(qk_norm=True)


@pytest.mark.parametrize("arch, expected", [
    (model("llama", BLOCK, BLOCK), "llama"),
    (model("mistral", cut(n_heads=4), cut(n_heads=4)), "llama"),  # heads need not fill hidden_size
    (model("llama", BLOCK, cut(intermediate=40)), "deci"),
    (model("llama", cut(o_bias=True, qkv_bias=True, mlp_bias=True), cut(o_bias=True, qkv_bias=True, mlp_bias=True)),
     "llama"),
    (model("qwen2", QWEN2, QWEN2), "qwen2"),
    (model("qwen2", cut(qkv_bias=True, n_heads=4), cut(qkv_bias=True, n_heads=4)), "deci"),  # 4 x 8 != 64
    (model("qwen2", QWEN2, cut(qkv_bias=True, n_kv=1, n_heads=4)), "deci"),
    (model("qwen3", QWEN3, QWEN3), "qwen3"),
    (model("qwen3", cut(qk_norm=True, n_heads=4), cut(qk_norm=True, n_heads=4)), "qwen3"),
    (model("qwen3", cut(qk_norm=True, qkv_bias=True), cut(qk_norm=True, qkv_bias=True)), "qwen3"),
])
def test_the_family_architecture_where_it_holds_the_model_else_deci(arch, expected):
    assert choose(arch).name == expected


@pytest.mark.parametrize("arch, words", [
    (model("qwen3", QWEN3, cut(qk_norm=True, intermediate=40)),
     ["its qwen3 architecture builds every layer with the first one's shape", "deci has no q/k norms"]),
    (model("qwen3", cut(qk_norm=True, qkv_bias=True, o_bias=True), cut(qk_norm=True, qkv_bias=True, o_bias=True)),
     ["its qwen3 architecture loads no o bias", "deci has no q/k norms", "--allocation uniform"]),
])
def test_what_no_architecture_holds_is_refused(arch, words):
    with pytest.raises(StreamPruneError) as e:
        choose(arch)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_what_each_architecture_requires():
    assert cannot_hold(ARCHS["qwen2"], model("qwen2", BLOCK)) == "needs k/q/v biases"
    assert cannot_hold(ARCHS["llama"], model("llama", QWEN3)) == "has no q/k norms"
    assert cannot_hold(ARCHS["qwen3"], model("qwen3", BLOCK)) == "needs q/k norms"
    assert cannot_hold(ARCHS["qwen2"], model("qwen2", QWEN2), rope_factors=True).startswith("takes no rotary")
    assert cannot_hold(ARCHS["deci"], model("llama", BLOCK, cut(n_heads=2, n_kv=1)), rope_factors=True) is None


# ---- the matrix, through llama.cpp ----

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
MATRIX = list(itertools.product(FAMILIES, ["uniform", "global"], ["lsq", "mean"]))


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dense")
    return {f: confident_model(tmp / f, f, **({"sliding_window": None} if f == "mistral" else {}), rope_parameters=None)
            for f in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family, allocation, compensation", MATRIX)
def test_every_pruned_output_runs_in_llama_cpp_or_is_refused(dense, tmp_path, family, allocation, compensation):
    pytest.importorskip("xllamacpp")
    from streamprune.inputs.calibration import load_tokenizer, tokenize_file
    from tests.llamacpp import loader_gap
    out, gguf = tmp_path / "out", tmp_path / "m.gguf"
    r = invoke("run", "--shards", dense[family], "--out", out, "--calib", TINYSTORIES / "calib.txt", "--samples", 8,
               "--seq-len", 64, "--sparsity", 0.5, "--allocation", allocation, "--compensate", compensation, "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("export", out, "--gguf", gguf, "--type", "f32", "--quiet")
    if r.exit_code:
        assert family == "qwen3", r.stderr
        refused(r, "llama.cpp cannot run this qwen3 model exactly")
        assert not any(tmp_path.glob("*.gguf*")) and not any(tmp_path.glob(".*partial"))
        return
    config = json.loads((out / "config.json").read_text())
    architecture = r.stdout.split("llama.cpp architecture ")[1].split(",")[0]
    assert architecture == ("deci" if "per_layer_config" in config or
                            family == "qwen2" and config["num_attention_heads"] * 8 != 64 else
                            {"mistral": "llama"}.get(family, family))
    ids = tokenize_file(load_tokenizer(out), TINYSTORIES / "eval.txt", special_tokens=True)[:48]
    assert loader_gap(out, gguf, ids) < 1e-3
