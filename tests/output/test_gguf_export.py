"""streamprune export: every family and allocation the export supports runs in llama.cpp (the
prebuilt xllamacpp wheel) as it runs in streamprune: the log-probability of every token of a
window, perplexity against `streamprune eval` (0.1% in f32), greedy generation and tokenization;
quantized types load and stay close; what llama.cpp cannot run exactly is refused, nothing written."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from streamprune import load_pretrained
from streamprune.engine.evaluate import eval_windows, perplexity
from streamprune.errors import StreamPruneError
from streamprune.inputs.calibration import load_tokenizer, tokenize_file
from streamprune.output.gguf_export import export_gguf, permute_rotary, tensor_type
from tests.harness import refused, run_cli
from tests.llamacpp import llama_cpp, loader_gap
from tests.models import SHARED, TINYSTORIES, confident_model, save_tiny_model

# The tests that run the GGUF file need llama.cpp (the xllamacpp wheel, in the test extra); the others do not.
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                                     reason="llama.cpp is not installed (xllamacpp: pip install -e '.[test]')")

DEMO = TINYSTORIES / "stories260K"
DEMO_TEXT = TINYSTORIES / "eval.txt"
KJV = SHARED / "models"
KJV_TEXT = SHARED / "data" / "kjv" / "eval.txt"
WINDOW = 64


def cli(*args) -> subprocess.CompletedProcess:
    return run_cli([str(a) for a in args])


def prune(model: Path, out: Path, *extra) -> Path:
    r = cli("run", "--shards", model, "--out", out, "--calib", TINYSTORIES / "calib.txt", "--samples", 8,
            "--seq-len", 64, "--sparsity", 0.4, "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (model folder, text): inputs and pruned outputs of every supported kind."""
    tmp = tmp_path_factory.mktemp("gguf")
    out = {"demo dense (llama)": (DEMO, DEMO_TEXT),
           "demo global (deci)": (prune(DEMO, tmp / "demo-global"), DEMO_TEXT)}
    for family, extra in (("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": None})):
        dense = confident_model(tmp / family, family, **extra)
        out[f"{family} global"] = (prune(dense, tmp / f"{family}-global"), DEMO_TEXT)
    out["llama uniform, mean compensation"] = (prune(tmp / "llama", tmp / "llama-mean", "--allocation", "uniform",
                                                     "--compensate", "mean"), DEMO_TEXT)
    out["llama global, mean compensation"] = (prune(tmp / "llama", tmp / "llama-mean-g", "--compensate", "mean"),
                                              DEMO_TEXT)
    qwen3 = confident_model(tmp / "qwen3", "qwen3")
    out["qwen3 uniform"] = (prune(qwen3, tmp / "qwen3-uniform", "--allocation", "uniform"), DEMO_TEXT)
    out["qwen2 dense"] = (tmp / "qwen2", DEMO_TEXT)
    if (KJV / "kjv-llama-6.8m").is_dir():
        out["kjv-llama dense (byte-level BPE)"] = (KJV / "kjv-llama-6.8m", KJV_TEXT)
        out["kjv-qwen3 dense"] = (KJV / "kjv-qwen3-10.9m", KJV_TEXT)
    return out


OWN_TOKENIZER = {"demo dense (llama)", "demo global (deci)", "kjv-llama dense (byte-level BPE)", "kjv-qwen3 dense"}
CASES = ["demo dense (llama)", "demo global (deci)", "llama global", "qwen2 global", "mistral global",
         "llama uniform, mean compensation", "llama global, mean compensation", "qwen3 uniform", "qwen2 dense",
         "kjv-llama dense (byte-level BPE)", "kjv-qwen3 dense"]


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_computes_what_streamprune_does(models, case, tmp_path):
    if case not in models:
        pytest.skip("needs ../shared/models")
    folder, text = models[case]
    gguf = tmp_path / "model.gguf"
    r = cli("export", folder, "--gguf", gguf, "--type", "f32", "--quiet")
    assert r.returncode == 0, r.stderr
    tokenizer = load_tokenizer(folder)
    ids = tokenize_file(tokenizer, text, special_tokens=True)
    windows = eval_windows(ids, WINDOW, max_windows=3)
    model = load_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = model(windows).logits.log_softmax(-1)
    ours = perplexity(folder, text, WINDOW, max_windows=3)
    with llama_cpp(gguf) as llm:
        # the log-probability of every token of the first window
        got = torch.tensor(llm.logprobs(windows[0].tolist()))
        want = ref[0, :-1].gather(-1, windows[0, 1:, None])[:, 0]
        assert (got - want).abs().max() < 1e-3, (got - want).abs().max()
        assert want.std() > 0.3  # the model is not trivially flat
        # perplexity over the same windows as streamprune's own evaluation
        assert abs(llm.perplexity(windows) / ours.ppl - 1) < 1e-3
        # greedy generation
        prompt = windows[1, :16].tolist()
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones(1, 16, dtype=torch.long))[0, 16:].tolist()
        assert llm.greedy(prompt, len(expected)) == expected
        # transformers gives a Qwen2 folder its own class over the borrowed tokenizer.json
        if case not in OWN_TOKENIZER:
            return
        sample = Path(text).read_text(encoding="utf-8")[:3000]
        assert llm.tokenize(sample) == tokenizer(sample).input_ids


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q5_0", "q4_0"])
def test_types_people_deploy_load_and_stay_close(models, kind, tmp_path):
    folder, text = models["demo global (deci)"]
    gguf = tmp_path / "model.gguf"
    r = cli("export", folder, "--gguf", gguf, "--type", kind, "--quiet")
    assert r.returncode == 0, r.stderr
    if kind in ("q8_0", "q5_0", "q4_0"):  # the demo's per-block neuron counts are not multiples of 32
        assert "ffn_down.weight: F16 (rows of" in r.stdout
        assert "to quantize every matrix: prune with --row-multiple 32" in r.stdout
    windows = eval_windows(tokenize_file(load_tokenizer(folder), text, special_tokens=True), WINDOW, max_windows=3)
    ours = perplexity(folder, text, WINDOW, max_windows=3).ppl
    with llama_cpp(gguf, exact=False) as llm:
        ppl = llm.perplexity(windows)
    # a 260K-parameter model: 4 bits cost it most
    tolerance = {"f16": 0.01, "bf16": 0.02, "q8_0": 0.02, "q5_0": 0.15, "q4_0": 0.5}[kind]
    assert abs(ppl / ours - 1) < tolerance, (ppl, ours)


def test_tensor_types_and_fallbacks():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0") == ("F32", None)
    assert tensor_type("blk.0.ffn_up.weight", (96, 64), "q4_0") == ("Q4_0", None)
    assert tensor_type("blk.0.ffn_down.weight", (64, 152), "q8_0") == (
        "F16", "rows of 152 do not split into Q8_0's blocks of 32")
    assert tensor_type("output.weight", (512, 64), "q4_0") == ("Q8_0", "lm_head kept at 8 bits")
    assert tensor_type("output.weight", (512, 64), "f16") == ("F16", None)


def test_rotary_permutation_pairs_each_heads_halves():
    """Row j of a head (first half) and row j + D/2 (second half) become rows 2j and 2j + 1."""
    D, heads = 8, 3
    w = torch.arange(heads * D, dtype=torch.float32)[:, None]
    p = permute_rotary(w, heads)[:, 0].view(heads, D)
    assert p[1].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def export_refused(folder: Path, tmp_path: Path, *words: str):
    """`export --gguf` of `folder` is refused in one line holding each of `words`; no .gguf, not even a partial one."""
    gguf = tmp_path / "out.gguf"
    refused(cli("export", folder, "--gguf", gguf, "--quiet"), *map(re.escape, words))
    assert not gguf.exists() and not any(tmp_path.glob("*.partial"))


@pytest.mark.slow
def test_per_block_qwen3_is_refused(tmp_path):
    qwen3 = confident_model(tmp_path / "qwen3", "qwen3")
    for sparsity in (0.4, 0.5, 0.6):  # the first that gives the blocks shapes of their own
        out = prune(qwen3, tmp_path / f"q3-{sparsity}", "--sparsity", sparsity)
        if "per_layer_config" in json.loads((out / "config.json").read_text()):
            break
    else:
        pytest.fail("no sparsity gave this model per-block shapes")
    export_refused(out, tmp_path, "Qwen3", "--allocation uniform", "exported:")


@pytest.mark.slow
def test_sliding_window_is_refused(tmp_path):
    mistral = save_tiny_model(tmp_path / "m", "mistral", tokenizer_from=DEMO, vocab=512)
    export_refused(mistral, tmp_path, "sliding window of 16", "exported:")


@pytest.mark.slow
def test_unknown_rope_and_tokenizer_are_refused(tmp_path):
    yarn = save_tiny_model(tmp_path / "yarn", "qwen2", tokenizer_from=DEMO, vocab=512,
                           rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 128})
    export_refused(yarn, tmp_path, "rope_type 'yarn'")
    plain = save_tiny_model(tmp_path / "plain", "llama", vocab=512)
    export_refused(plain, tmp_path, "no tokenizer.json")


@pytest.mark.slow
def test_bad_destinations(tmp_path):
    refused(cli("export", DEMO, "--gguf", tmp_path / "missing" / "x.gguf"), "--gguf: folder .*missing does not exist")
    refused(cli("export", tmp_path / "nothing", "--gguf", tmp_path / "x.gguf"), "model folder not found: .*nothing$")
    with pytest.raises(StreamPruneError, match="unknown --type"):
        export_gguf(DEMO, tmp_path / "x.gguf", "q3_k")


@pytest.mark.slow
def test_a_run_with_row_multiple_32_quantizes_every_matrix(tmp_path):
    out = prune(DEMO, tmp_path / "r32", "--row-multiple", "32")
    r = cli("export", out, "--gguf", tmp_path / "q4.gguf", "--type", "q4_0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "in another type" not in r.stdout and "tensors in Q4_0" in r.stdout, r.stdout


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_linear_rope_scaling_past_the_original_window(family, tmp_path):
    """Linear scaling goes in as llama.cpp's rope.scaling.factor (llama3's as rope_freqs, below)."""
    folder = confident_model(tmp_path / family, family,
                             rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    assert cli("export", folder, "--gguf", tmp_path / "m.gguf", "--type", "f32", "--quiet").returncode == 0
    ids = tokenize_file(load_tokenizer(folder), DEMO_TEXT, special_tokens=True)[:160]
    assert loader_gap(folder, tmp_path / "m.gguf", ids) < 1e-3


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.slow
@needs_llama_cpp
def test_llama3_rope_on_a_qwen2_goes_through_deci(tmp_path):
    """llama.cpp's qwen2 takes no rope_freqs tensor; deci does, with Qwen2's biases."""
    folder = confident_model(tmp_path / "q", "qwen2", rope_parameters=LLAMA3)
    r = cli("export", folder, "--gguf", tmp_path / "m.gguf", "--type", "f32", "--quiet")
    assert r.returncode == 0 and "architecture deci" in r.stdout, r.stdout + r.stderr
    ids = tokenize_file(load_tokenizer(folder), DEMO_TEXT, special_tokens=True)[:160]
    assert loader_gap(folder, tmp_path / "m.gguf", ids) < 1e-3


@pytest.mark.slow
def test_llama3_rope_on_a_qwen3_is_refused(tmp_path):
    qwen3 = save_tiny_model(tmp_path / "q", "qwen3", tokenizer_from=DEMO, vocab=512, rope_parameters=LLAMA3)
    export_refused(qwen3, tmp_path, "its qwen3 architecture takes no rotary frequency factors",
                   "deci has no q/k norms")


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("add_prefix_space", [True, False])
def test_llama_cpp_tokenizes_as_transformers_with_or_without_the_space_prefix(tmp_path, add_prefix_space):
    """The demo's SentencePiece-style tokenizer with tokenizer_config.json's add_prefix_space (LlamaTokenizer
    then sets Metaspace's prepend_scheme): llama.cpp's add_space_prefix follows what transformers runs."""
    import json
    import shutil
    folder = Path(shutil.copytree(DEMO, tmp_path / "demo"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, add_prefix_space=add_prefix_space)))
    assert cli("export", folder, "--gguf", tmp_path / "m.gguf", "--type", "f32", "--quiet").returncode == 0
    sample = DEMO_TEXT.read_text(encoding="utf-8")[:3000]
    with llama_cpp(tmp_path / "m.gguf") as llm:
        assert llm.tokenize(sample) == load_tokenizer(folder)(sample).input_ids
