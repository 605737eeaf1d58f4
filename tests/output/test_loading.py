"""Per-block outputs (config.json with transformers' `per_layer_config`) load with
streamprune.load_pretrained into the family's stock classes and compute exactly what the dense
model computes with the removed heads and neurons masked out; generate() and save_pretrained work;
stock from_pretrained refuses them loudly; uniform outputs stay stock configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import streamprune
from streamprune.arch.families import architecture, read_config
from streamprune.arch.model import open_model
from streamprune.arch.output_config import heterogeneous_config, pruned_config
from streamprune.engine import evaluate
from streamprune.errors import StreamPruneError
from tests.models import DEVICES, TINYSTORIES, save_tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
H, KV, D, INTER = 8, 2, 8, 96  # tiny_config: 8 heads in 2 KV groups of 4, head_dim 8, 96 neurons
STOCK_CLASS = {"llama": "MistralForCausalLM", "mistral": "MistralForCausalLM",  # Llama: heads vary -> Mistral
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def plan_layer(gen: torch.Generator, kv: list[int], per_group: int, neurons: int) -> dict:
    """Kept units of one block: KV groups `kv`, `per_group` query heads in each (a different
    random choice per group), `neurons` random MLP neurons."""
    heads = [g * (H // KV) + j for g in kv for j in sorted(torch.randperm(H // KV, generator=gen)[:per_group].tolist())]
    return {"kv": kv, "heads": heads, "neurons": sorted(torch.randperm(INTER, generator=gen)[:neurons].tolist())}


def plans(drop: bool = False) -> list[dict | None]:
    """A different shape in every block; block 1 keeps everything; block 2 dropped when `drop`."""
    gen = torch.Generator().manual_seed(0)
    return [plan_layer(gen, [0, 1], 2, 40), plan_layer(gen, [0, 1], 4, INTER),
            None if drop else plan_layer(gen, [1], 3, 64), plan_layer(gen, [0], 1, 17)]


def head_rows(heads: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])


def sliced_state(state: dict, layer_plans: list[dict | None]) -> dict:
    """The dense weights cut to each block's kept units, dropped blocks removed and the rest renumbered."""
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    kept = [(i, p) for i, p in enumerate(layer_plans) if p is not None]
    for j, (i, p) in enumerate(kept):
        q, kv, n = head_rows(p["heads"]), head_rows(p["kv"]), torch.tensor(p["neurons"])
        cut = {"self_attn.q_proj": (0, q), "self_attn.k_proj": (0, kv), "self_attn.v_proj": (0, kv),
               "self_attn.o_proj": (1, q), "mlp.gate_proj": (0, n), "mlp.up_proj": (0, n), "mlp.down_proj": (1, n)}
        prefix = f"model.layers.{i}."
        for name, t in state.items():
            if not name.startswith(prefix):
                continue
            short = name[len(prefix):]
            module, kind = short.rsplit(".", 1)
            if module in cut and not (kind == "bias" and cut[module][0] == 1):
                dim, ix = cut[module]
                t = t.index_select(dim if kind == "weight" else 0, ix)
            out[f"model.layers.{j}.{short}"] = t.contiguous()
    return out


def masked_dense(dense, layer_plans: list[dict | None]):
    """The reference: the dense model with removed heads' o_proj columns and removed neurons'
    down_proj columns zeroed (a dropped block: all of them, so the block adds nothing)."""
    with torch.no_grad():
        for layer, p in zip(dense.model.layers, layer_plans):
            keep_q = torch.zeros(H * D, dtype=torch.bool)
            keep_n = torch.zeros(INTER, dtype=torch.bool)
            if p is not None:
                keep_q[head_rows(p["heads"])] = True
                keep_n[p["neurons"]] = True
            layer.self_attn.o_proj.weight[:, ~keep_q] = 0
            layer.mlp.down_proj.weight[:, ~keep_n] = 0
    return dense.eval()


def shape_of(p: dict | None) -> dict | None:
    return None if p is None else {"n_heads": len(p["heads"]), "n_kv": len(p["kv"]), "intermediate": len(p["neurons"])}


def write_cut(folder: Path, src: Path, layer_plans: list[dict | None]) -> Path:
    """A per-block output folder cut by hand from the model in `src`."""
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = dense.state_dict()
    if dense.config.tie_word_embeddings:
        del state["lm_head.weight"]  # stored once, as the embedding
    folder.mkdir()
    save_file(sliced_state(state, layer_plans), str(folder / "model.safetensors"))
    config = heterogeneous_config(read_config(src), [shape_of(p) for p in layer_plans])
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def src(tmp_path, family):
    # mistral: sliding window 16 < the 20-token inputs below
    return save_tiny_model(tmp_path / "dense", family, layers=4)


@pytest.fixture
def qwen2(tmp_path):
    """One family for the checks that do not depend on it (Qwen2: q/k/v biases are sliced too)."""
    return save_tiny_model(tmp_path / "dense", "qwen2", layers=4)


def reference(src: Path, layer_plans):
    return masked_dense(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), layer_plans)


IDS = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_per_block_logits_equal_masked_dense(tmp_path, src, family, device):
    cut = write_cut(tmp_path / "cut", src, plans())
    model = streamprune.load_pretrained(cut, device=device)
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {device}
    assert type(model).__name__ == STOCK_CLASS[family] and not model.training
    for layer, p in zip(model.model.layers, plans()):
        assert layer.self_attn.q_proj.out_features == len(p["heads"]) * D
        assert layer.self_attn.num_key_value_groups == len(p["heads"]) // len(p["kv"])
        assert layer.mlp.down_proj.in_features == len(p["neurons"])
    with torch.no_grad():
        ref = reference(src, plans()).to(device)(IDS.to(device)).logits
        diff = (model(IDS.to(device)).logits - ref).abs().max().item()
    assert diff <= (1e-5 if device == "cpu" else 1e-4)  # GPU kernels differ by shape


@pytest.mark.slow
def test_generate_equals_masked_dense_greedy(tmp_path, src):
    """generate() with a KV cache whose layers hold different numbers of KV heads."""
    cut = write_cut(tmp_path / "cut", src, plans())
    model = streamprune.load_pretrained(cut)
    out = model.generate(IDS[:2], attention_mask=torch.ones_like(IDS[:2]), max_new_tokens=6, do_sample=False)
    ref = reference(src, plans()).generate(IDS[:2], attention_mask=torch.ones_like(IDS[:2]), max_new_tokens=6,
                                            do_sample=False)
    assert out.shape == (2, 26) and torch.equal(out, ref)
    static = model.generate(IDS[:2], attention_mask=torch.ones_like(IDS[:2]), max_new_tokens=6, do_sample=False,
                            cache_implementation="static")  # sized per layer from per_layer_config
    assert torch.equal(static, ref)
    with torch.no_grad():
        cache = model(IDS[:1], use_cache=True).cache
    assert [layer.keys.shape[1] for layer in cache.layers] == [len(p["kv"]) for p in plans()]


@pytest.mark.slow
def test_dropped_block_is_removed_and_renumbered(tmp_path, src, family):
    cut = write_cut(tmp_path / "cut", src, plans(drop=True))
    config = read_config(cut)
    assert config["num_hidden_layers"] == 3 and set(config["per_layer_config"]) == {"0", "2"}
    model = streamprune.load_pretrained(cut)
    with torch.no_grad():
        diff = (model(IDS).logits - reference(src, plans(drop=True))(IDS).logits).abs().max().item()
    assert diff <= 1e-5
    out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, reference(src, plans(drop=True)).generate(IDS[:1], max_new_tokens=4, do_sample=False))


@pytest.mark.slow
def test_uniform_blocks_with_a_dropped_one_are_a_stock_config(tmp_path, src, family):
    """Kept blocks of one shape: renumbering keeps the output a stock config (no per_layer_config)
    that stock from_pretrained loads with no missing or unexpected weights."""
    gen = torch.Generator().manual_seed(2)
    layer_plans = [plan_layer(gen, [0, 1], 2, 40), None, plan_layer(gen, [0, 1], 2, 40), None]
    cut = write_cut(tmp_path / "cut", src, layer_plans)
    config = read_config(cut)
    assert "per_layer_config" not in config and config["num_hidden_layers"] == 2
    stock, info = AutoModelForCausalLM.from_pretrained(cut, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model = streamprune.load_pretrained(cut)
    with torch.no_grad():
        ref = reference(src, layer_plans)(IDS).logits
        assert (stock(IDS).logits - ref).abs().max().item() <= 1e-5
        assert torch.equal(model(IDS).logits, stock(IDS).logits)


@pytest.mark.slow
def test_save_pretrained_round_trips(tmp_path, src):
    cut = write_cut(tmp_path / "cut", src, plans(drop=True))
    model = streamprune.load_pretrained(cut)
    model.save_pretrained(tmp_path / "saved")
    saved = read_config(tmp_path / "saved")
    assert saved["per_layer_config"] == read_config(cut)["per_layer_config"]
    assert "allow_global_per_layer_attribute_access" not in saved
    again = streamprune.load_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
    half = streamprune.load_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_attention_implementation_can_be_switched(tmp_path, qwen2):
    """The rebuilt layers follow model.set_attn_implementation like stock ones."""
    model = streamprune.load_pretrained(write_cut(tmp_path / "cut", qwen2, plans()))
    with torch.no_grad():
        before = model(IDS).logits
        model.set_attn_implementation("eager")
        assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers)
        assert (model(IDS).logits - before).abs().max().item() <= 1e-5


def test_stock_from_pretrained_refuses_per_block_output(tmp_path, src):
    """transformers 5.x reads the per-layer config but cannot build per-layer shapes: it raises
    instead of silently building every layer with the global shape."""
    cut = write_cut(tmp_path / "cut", src, plans())
    assert AutoConfig.from_pretrained(cut).is_heterogeneous
    with pytest.raises(Exception, match="per-layer attribute"):
        AutoModelForCausalLM.from_pretrained(cut)


@pytest.mark.slow
def test_uniform_folder_loads_through_stock_from_pretrained(tmp_path, src):
    model = streamprune.load_pretrained(src)
    stock = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, stock(IDS).logits)


def test_uniform_shapes_are_exactly_pruned_config(src):
    config = read_config(src)
    shape = {"n_heads": 6, "n_kv": 2, "intermediate": 40}
    assert heterogeneous_config(config, [shape] * 4) == pruned_config(config, 6, 2, 40)
    assert heterogeneous_config(config, [shape] * 4, {"attention", "mlp"}) == \
        pruned_config(config, 6, 2, 40, {"attention", "mlp"})


def test_model_spec_reads_per_block_shapes(tmp_path, src):
    cut = write_cut(tmp_path / "cut", src, plans(drop=True))
    spec = open_model(cut).arch  # every tensor checked against its block's shape
    kept = [p for p in plans(drop=True) if p is not None]
    assert spec.n_layers == 3
    assert [(b.n_heads, b.n_kv, b.intermediate, b.head_dim) for b in spec.blocks] == \
        [(len(p["heads"]), len(p["kv"]), len(p["neurons"]), D) for p in kept]


@pytest.mark.slow
def test_streaming_perplexity_of_per_block_output(tmp_path):
    """streamprune eval's engine runs block by block from architecture: on a per-block output it
    gives what the loaded model gives (tied embeddings: no lm_head tensor in the folder)."""
    src = save_tiny_model(tmp_path / "dense", "qwen3", layers=4, vocab=512, tie_word_embeddings=True,
                          tokenizer_from=TINYSTORIES / "stories260K")
    cut = write_cut(tmp_path / "cut", src, plans(drop=True))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (cut / name).write_bytes((src / name).read_bytes())
    text = tmp_path / "eval.txt"
    text.write_text((TINYSTORIES / "eval.txt").read_text()[:2000])
    r = evaluate.perplexity(cut, text, 32, "cpu")
    ids = AutoTokenizer.from_pretrained(cut)(text.read_text()).input_ids
    windows = torch.tensor(ids[:len(ids) // 32 * 32]).view(-1, 32)
    with torch.no_grad():
        ppl = torch.exp(streamprune.load_pretrained(cut)(windows, labels=windows).loss).item()
    assert abs(r.ppl - ppl) / ppl <= 1e-4


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["per_layer_config"]["0"].update(skip=["attention"]), "skips attention in layer 0"),
    (lambda c: c["per_layer_config"]["0"].update(head_dim=4), "overrides head_dim"),
])
def test_unsupported_per_layer_configs_are_refused(tmp_path, qwen2, edit, message):
    cut = write_cut(tmp_path / "cut", qwen2, plans())
    config = read_config(cut)
    edit(config)
    (cut / "config.json").write_text(json.dumps(config))
    with pytest.raises(StreamPruneError, match=message):
        streamprune.load_pretrained(cut)
    with pytest.raises(StreamPruneError, match=message):
        architecture(config)


def test_weights_must_match_the_config_exactly(tmp_path, qwen2):
    cut = write_cut(tmp_path / "cut", qwen2, plans())
    from safetensors.torch import load_file
    state = load_file(cut / "model.safetensors")
    save_file({**state, "model.layers.0.extra": torch.zeros(2)}, str(cut / "model.safetensors"))
    with pytest.raises(StreamPruneError, match="unexpected keys model.layers.0.extra"):
        streamprune.load_pretrained(cut)
    del state["model.layers.3.mlp.up_proj.weight"]
    save_file(state, str(cut / "model.safetensors"))
    with pytest.raises(StreamPruneError, match="missing tensor model.layers.3.mlp.up_proj.weight"):
        streamprune.load_pretrained(cut)


def test_remote_code_is_never_run(tmp_path, qwen2):
    """auto_map in config.json and a .py in the folder: neither is imported."""
    cut = write_cut(tmp_path / "cut", qwen2, plans())
    marker = tmp_path / "ran"
    (cut / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for folder in (cut, qwen2):
        config = read_config(folder)
        config["auto_map"] = {"AutoModelForCausalLM": "evil.Model", "AutoConfig": "evil.Config"}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "evil.py").write_text((cut / "evil.py").read_text())
        streamprune.load_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize("shape,message", [
    ({"n_heads": 3, "n_kv": 2, "intermediate": 40}, "not a valid layer"),
    ({"n_heads": 0, "n_kv": 0, "intermediate": 40}, "not a valid layer"),
    ({"n_heads": 4, "n_kv": 2, "intermediate": 0}, "not a valid layer"),
])
def test_invalid_block_shapes_are_refused(qwen2, shape, message):
    full = {"n_heads": H, "n_kv": KV, "intermediate": INTER}
    with pytest.raises(StreamPruneError, match=message):
        heterogeneous_config(read_config(qwen2), [shape, full, full, full])


def test_llama_with_biases_and_varying_heads_is_refused(tmp_path):
    src = save_tiny_model(tmp_path / "dense", "llama", layers=2, attention_bias=True)
    full = {"n_heads": H, "n_kv": KV, "intermediate": INTER}
    with pytest.raises(StreamPruneError, match="no stock equivalent"):
        heterogeneous_config(read_config(src), [{"n_heads": 4, "n_kv": 2, "intermediate": 40}, full])
    # neurons and KV heads may vary per layer in a Llama: it stays a Llama
    out = heterogeneous_config(read_config(src), [{"n_heads": 8, "n_kv": 1, "intermediate": 40}, full])
    assert out["model_type"] == "llama" and out["per_layer_config"] == {
        "0": {"num_key_value_heads": 1, "intermediate_size": 40}}


@pytest.mark.slow
def test_import_streamprune_stays_light():
    code = "import sys, streamprune; assert 'torch' not in sys.modules; assert callable(streamprune.load_pretrained)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_the_output_config_names_the_transformers_version_that_wrote_it(tmp_path, qwen2):
    import transformers
    config = read_config(qwen2)
    config["transformers_version"] = "4.0.0"
    from streamprune.arch.output_config import pruned_config
    assert pruned_config(config, 2, 1, 10)["transformers_version"] == transformers.__version__
