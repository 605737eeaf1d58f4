"""Every rope type transformers knows, through run (per-block output), load_pretrained, streaming
evaluation and the GGUF export: the output loads and evaluates as the loaded model computes it,
and the export either runs in llama.cpp or is refused in one line. A run never writes what its
own loader refuses."""

import json

import pytest
import torch
from click.testing import CliRunner

import streamprune
from streamprune.cli import main
from streamprune.engine.evaluate import eval_windows, perplexity
from streamprune.inputs.calibration import load_tokenizer, tokenize_file
from tests.models import TINYSTORIES, save_tiny_model

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 128,
                 "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
EXPORTED = {"default", "linear", "llama3"}
PER_BLOCK_REFUSED = {"longrope"}  # transformers' longrope validation reads num_attention_heads, per-layer there
TEXT = TINYSTORIES / "eval.txt"


def test_every_rope_type_transformers_knows_is_covered():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    assert set(ROPE_INIT_FUNCTIONS) - {"proportional"} <= set(ROPES)  # proportional: Gemma's, not these families'


@pytest.mark.slow
@pytest.mark.parametrize("rope", ROPES)
def test_run_load_eval_and_export(tmp_path, rope):
    src = save_tiny_model(tmp_path / "in", "llama", layers=3, vocab=512, tokenizer_from=TINYSTORIES / "stories260K",
                          rope_parameters=ROPES[rope])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", "--shards", str(src), "--out", str(out), "--calib",
                                  str(TINYSTORIES / "calib.txt"), "--samples", "8", "--seq-len", "64",
                                  "--sparsity", "0.4", "--quiet"])
    if rope in PER_BLOCK_REFUSED:  # up front, before the survey: nothing written
        assert r.exit_code == 2 and r.output.startswith("error: --allocation global writes blocks of different "
                                                        "shapes") and r.output.endswith("use --allocation uniform\n")
        assert not (out / "model.safetensors.index.json").exists()
        return
    assert r.exit_code == 0, r.output
    assert "per_layer_config" in json.loads((out / "config.json").read_text())
    model = streamprune.load_pretrained(out)
    windows = eval_windows(tokenize_file(load_tokenizer(out), TEXT, special_tokens=True), 256, 2)  # past 128
    with torch.no_grad():
        loss = model(windows, labels=windows).loss.item()
    assert abs(perplexity(out, TEXT, 256, max_windows=2).nll - loss) < 1e-4
    r = CliRunner().invoke(main, ["export", str(out), "--gguf", str(tmp_path / "m.gguf"), "--type", "f32", "--quiet"])
    if rope in EXPORTED:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code == 2 and r.output == (f"error: rope_type {rope!r} has no exact llama.cpp equivalent here; "
                                                 "exported: default, linear and llama3 rotary embeddings\n")
        assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_an_unknown_rope_type_is_one_line_without_transformers_warnings(tmp_path):
    import subprocess
    import sys
    src = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=TINYSTORIES / "stories260K")
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "weird", "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "streamprune", "inspect", "--shards", str(src)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: config.json: unknown rope_type 'weird'"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
