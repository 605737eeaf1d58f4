"""End to end: run the streaming pipeline on tiny sharded models of every family and check the
output against the input (sparsity 0), against transformers (loads, same computation), and
against itself (resume is byte-identical). The device-parametrized tests also run on CUDA where
a GPU is present, and the CUDA run is compared with the CPU run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from streamprune.config import RunConfig
from streamprune.engine import pipeline
from streamprune.errors import StreamPruneError
from streamprune.inputs.calibration import bos_id, load_tokenizer, token_windows, tokenize_file
from streamprune.pruning.scoring.perturb import MASKS
from streamprune.store.cache import ActivationCache
from tests.harness import change_tensor, digests, interrupt_pruning_at, run_config, tiny_model
from tests.models import DEVICES, save_tiny_model

DEMO = Path(__file__).resolve().parents[2] / "demo"
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def load(folder):
    """A pruned folder as stock transformers classes build it: from_pretrained for a stock config,
    load_pretrained (the same classes, layer by layer) for per-block shapes; strict weights."""
    if "per_layer_config" not in json.loads((Path(folder) / "config.json").read_text()):
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        return model.eval()
    from streamprune import load_pretrained
    return load_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype", [(f, torch.float32) for f in FAMILIES] + [("llama", torch.bfloat16),
                                                                                  ("qwen2", torch.float16)])
@pytest.mark.parametrize("device", DEVICES)
def test_sparsity_zero_is_identity(tmp_path, family, dtype, device):
    src = tiny_model(tmp_path, family, dtype=dtype)
    pipeline.run(run_config(src, tmp_path / "out", sparsity=0.0, device=device))
    before, after = tensors(src), tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(load(src)(ids).logits, load(tmp_path / "out")(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,compensate", [(f, "lsq") for f in FAMILIES] + [("llama", "mean"), ("qwen3", "mean")])
def test_pruned_output_loads_and_computes_what_the_pipeline_computed(tmp_path, family, compensate, device):
    """The last cached activations (pruned blocks run in our engine) equal the pruned model
    run by stock transformers on the same calibration windows (with mean compensation: with
    the biases it adds)."""
    src, out = tiny_model(tmp_path, family), tmp_path / "out"
    cfg = run_config(src, out, sparsity=0.5, keep_cache=True, device=device, compensate=compensate,
                 allocation="uniform")  # a stock config (the per-block case has its own test below)
    report = pipeline.run(cfg)
    # (uniform: the cheapest one shape within the budget, on this tiny model up to a head step past it)
    assert 0.5 <= report["block_params"]["removed_fraction"] < 0.6
    model = load(out)
    saved = json.loads((out / "config.json").read_text())
    assert model.config.num_attention_heads == saved["num_attention_heads"] == report["plan"]["heads"]
    tok = load_tokenizer(out)
    windows = token_windows(tokenize_file(tok, cfg.calib), cfg.samples, cfg.seq_len, bos_id(tok))
    with torch.no_grad():
        hidden = model.model(windows, output_hidden_states=True).hidden_states
    # hidden_states[-1] has the final norm applied; recompute the pre-norm residual from the layers
    cache = ActivationCache(out / ".streamprune" / "cache", cfg.samples, cfg.seq_len, model.config.hidden_size)
    streamed = cache.batch(model.config.num_hidden_layers, 0, cfg.samples)
    assert (model.model.norm(streamed) - hidden[-1]).abs().max() <= 1e-4


@pytest.mark.slow
def test_global_allocation_output_loads_and_computes_what_the_pipeline_computed(tmp_path):
    """Per-block shapes and a dropped block (one whose update is almost nothing): the output loads
    with streamprune.load_pretrained and equals the pipeline's own computation."""
    from streamprune import load_pretrained
    src, out = tiny_model(tmp_path, "llama", layers=4), tmp_path / "out"
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        change_tensor(src, f"model.layers.1.{name}", lambda t: t * 1e-4)
    cfg = run_config(src, out, sparsity=0.4, keep_cache=True, allocation="global", samples=8)
    report = pipeline.run(cfg)
    assert report["plan"]["dropped_blocks"] == [1] and report["blocks"][1]["dropped"]
    assert report["block_params"]["removed_fraction"] == pytest.approx(0.4, abs=0.02)
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3
    model = load_pretrained(out)
    tok = load_tokenizer(out)
    windows = token_windows(tokenize_file(tok, cfg.calib), cfg.samples, cfg.seq_len, bos_id(tok))
    with torch.no_grad():
        hidden = model.model(windows, output_hidden_states=True).hidden_states
    cache = ActivationCache(out / ".streamprune" / "cache", cfg.samples, cfg.seq_len, model.config.hidden_size)
    streamed = cache.batch(4, 0, cfg.samples)  # the outputs of the input's last block
    assert (model.model.norm(streamed) - hidden[-1]).abs().max() <= 1e-4


@pytest.mark.slow
def test_single_file_model_and_tied_embeddings(tmp_path):
    src = tiny_model(tmp_path, "qwen3", shard_size="10GB", tie_word_embeddings=True)
    assert (src / "model.safetensors").is_file() and not (src / "model.safetensors.index.json").exists()
    pipeline.run(run_config(src, tmp_path / "out"))
    model = load(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_llama_with_indivisible_head_count_is_written_as_mistral(tmp_path):
    src = tiny_model(tmp_path, "llama", heads=8, kv=4)  # at 25% keeps 3 KV groups x 2 = 6 heads; 64 % 6 != 0
    # (--row-multiple 1: with the default 32, 6 heads x head_dim 8 is not a multiple and the rule keeps 4)
    pipeline.run(run_config(src, tmp_path / "out", sparsity=0.25, allocation="rule", row_multiple=1))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_attention_heads"] == 6 and saved["model_type"] == "mistral"
    assert saved["sliding_window"] is None
    load(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_resume_after_interruption_is_byte_identical(tmp_path, monkeypatch, device):
    src = tiny_model(tmp_path, "qwen3", layers=4)
    pipeline.run(run_config(src, tmp_path / "whole", device=device))
    resume = interrupt_pruning_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(run_config(src, tmp_path / "resumed", device=device))
    assert not (tmp_path / "resumed" / "model.safetensors.index.json").exists()
    resume()
    pipeline.run(run_config(src, tmp_path / "resumed", device=device))
    assert digests(tmp_path / "whole") == digests(tmp_path / "resumed")
    assert not (tmp_path / "resumed" / ".streamprune" / "cache").exists()


@pytest.mark.slow
def test_rerun_with_other_arguments_refuses_and_restart_starts_over(tmp_path):
    src, out = tiny_model(tmp_path), tmp_path / "out"
    pipeline.run(run_config(src, out))
    pipeline.run(run_config(src, out))  # same arguments: already complete, nothing to do
    with pytest.raises(StreamPruneError, match="different arguments.*sparsity"):
        pipeline.run(run_config(src, out, sparsity=0.5))
    report = pipeline.run(run_config(src, out, sparsity=0.5, restart=True))
    assert report["arguments"]["sparsity"] == 0.5


def test_refuses_foreign_non_empty_output_folder(tmp_path):
    src, out = tiny_model(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StreamPruneError, match="not a streamprune output"):
        pipeline.run(run_config(src, out))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["perturb", "magnitude", "wanda-sp", "flap"])
def test_every_method_prunes_to_a_loadable_model_and_compensation_helps(tmp_path, method, device):
    src = tiny_model(tmp_path, "llama", dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    errors = {}
    for compensate in ("none", "lsq"):
        out = tmp_path / f"out-{compensate}"
        report = pipeline.run(run_config(src, out, method=method, compensate=compensate, samples=8, device=device,
                                     allocation="rule"))  # the rule cuts heads too
        errors[compensate] = [b["relative_error"] for b in report["blocks"]]
        assert report["arguments"]["method"] == method and report["arguments"]["compensate"] == compensate
        load(out)
    assert errors["lsq"][0] < errors["none"][0]
    if method == "perturb":
        assert report["blocks"][0]["scoring"]["perturbations"] == MASKS


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES[1:])
def test_gpu_prunes_the_demo_model_like_the_cpu(tmp_path, device):
    """fp32 on both devices: the block errors agree (the same units win, up to near-ties)."""
    errors, kept = {}, {}
    for d in ("cpu", device):
        report = pipeline.run(run_config(DEMO / "stories260K", tmp_path / d, device=d, samples=16, seq_len=64))
        errors[d] = [b["relative_error"] for b in report["blocks"]]
        kept[d] = [b["kept_heads"] for b in report["blocks"]]
    assert errors[device] == pytest.approx(errors["cpu"], rel=0.1), kept


@pytest.mark.parametrize("device", DEVICES)
def test_activation_cache_round_trip_in_chunks(tmp_path, monkeypatch, device):
    """Micro-batches larger than the host staging chunk are copied in pieces, exactly."""
    from streamprune.store import cache as cache_module
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 2 * 5 * 3 * 4)  # two samples of (5, 3) fp32
    c = ActivationCache(tmp_path, samples=7, seq_len=5, hidden=3)
    x = torch.randn(7, 5, 3)
    w = c.writer(0)
    w.write(0, x[:5].to(device))  # 2 + 2 + 1 samples
    w.write(5, x[5:].to(device))
    w.commit()
    assert torch.equal(c.batch(0, 0, 7), x)
    assert torch.equal(c.batch(0, 1, 6, device).cpu(), x[1:6])
    assert torch.equal(c.batch(0, 2, 7, device, torch.bfloat16).cpu(), x[2:7].to(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("family,added", [("llama", ["attention", "mlp"]), ("qwen3", ["attention"]), ("qwen2", [])])
def test_mean_compensation_adds_the_biases_the_family_can_carry_and_lowers_the_error(tmp_path, family, added):
    src = tiny_model(tmp_path, family)
    errors = {}
    for compensate in ("none", "mean"):
        report = pipeline.run(run_config(src, tmp_path / compensate, method="flap", compensate=compensate,
                                     sparsity=0.5, samples=8, allocation="rule"))
        errors[compensate] = sum(b["relative_error"] for b in report["blocks"])
    assert report["plan"]["biases_added"] == added
    saved = json.loads((tmp_path / "mean" / "config.json").read_text())
    assert bool(saved.get("attention_bias")) == ("attention" in added)
    assert bool(saved.get("mlp_bias")) == ("mlp" in added)
    model = load(tmp_path / "mean")
    if added:
        assert model.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
        assert errors["mean"] < errors["none"]


def test_a_text_that_holds_fewer_windows_than_processes_is_refused_after_fitting(tmp_path):
    """--samples left unset is fitted to the text before the count of processes is checked: a torchrun
    rank never gets zero windows."""
    from streamprune.pruning.ranks import Ranks

    class TwoRanks(Ranks):
        world = 2

    model = save_tiny_model(tmp_path / "in", "llama", layers=1, vocab=512, tokenizer_from=DEMO / "stories260K")
    short = tmp_path / "short.txt"
    short.write_text((DEMO / "calib.txt").read_text()[:150])  # 1 window of 64 tokens
    cfg = RunConfig(model, tmp_path / "out", calib=short, seq_len=64, adaptable=("samples",), progress=False)
    with pytest.raises(StreamPruneError, match=r"^--samples 1 \(what the calibration text holds\) is fewer than the 2"):
        pipeline.run_ranks(cfg, TwoRanks())
    assert not (tmp_path / "out").exists()
