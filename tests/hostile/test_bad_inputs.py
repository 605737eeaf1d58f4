"""Bad inputs are refused with one line on stderr starting `error:`, a non-zero exit, no
traceback, nothing marked complete in --out, and the input folder left untouched."""

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.harness import change_tensor, edit_config, invoke, nan_at, refused, sha256_tree, shard_of

DEMO = Path(__file__).resolve().parents[2] / "demo"
CALIB = DEMO / "calib.txt"
LAYER1_UP = "model.layers.1.mlp.up_proj.weight"


def drop_tensor(folder: Path, name: str) -> None:
    path = shard_of(folder, name)
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path: Path, nbytes: int) -> None:
    os.truncate(path, path.stat().st_size - nbytes)


def text_file(tmp: Path, text: str) -> Path:
    (tmp / "text").mkdir()
    (tmp / "text" / "calib.txt").write_text(text)
    return tmp / "text" / "calib.txt"


def a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("x")
    return tmp / "file"


def link_to(tmp: Path, target: Path) -> Path:
    (tmp / "link").symlink_to(target)
    return tmp / "link"


SHARD = "model-00010-of-00017.safetensors"  # holds layer 1's up_proj
# id -> (change the copied model folder `m` (tmp is a scratch folder) and return argument
# overrides, the message expected on stderr)
CASES = {
    "missing-folder": (lambda m, tmp: shutil.rmtree(m), "model folder not found"),
    "no-config": (lambda m, tmp: (m / "config.json").unlink(), "no config.json in"),
    "config-not-json": (lambda m, tmp: (m / "config.json").write_text("{oops"), "config.json is not valid JSON"),
    "unsupported-model-type": (lambda m, tmp: edit_config(m, model_type="gpt2"),
                               "unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3"),
    "index-not-json": (lambda m, tmp: (m / "model.safetensors.index.json").write_text("["),
                       "not a valid safetensors index"),
    "missing-shard": (lambda m, tmp: (m / SHARD).unlink(), f"missing shard .*{SHARD}"),
    "truncated-shard": (lambda m, tmp: truncate(m / SHARD, 100), f"{SHARD}: truncated"),
    "corrupt-header-bytes": (lambda m, tmp: overwrite(m / SHARD, 8, b"\xff" * 16),
                             f"{SHARD}: corrupt safetensors header"),
    "corrupt-header-length": (lambda m, tmp: overwrite(m / SHARD, 0, (2**40).to_bytes(8, "little")),
                              f"{SHARD}: corrupt safetensors header"),
    "shape-vs-config": (lambda m, tmp: edit_config(m, intermediate_size=128),
                        r"tensor model.layers.0.mlp.\w+_proj.weight has shape \[\d+, \d+\], config says"),
    "unsupported-dtype": (lambda m, tmp: change_tensor(m, LAYER1_UP, lambda t: t.double()),
                          f"tensor {LAYER1_UP} has unsupported dtype F64 \\(F32, F16, BF16 only\\)"),
    "heads-vs-kv-heads": (lambda m, tmp: edit_config(m, num_key_value_heads=3),
                          "num_attention_heads 8 is not a multiple of num_key_value_heads 3|rejected by transformers"),
    "missing-tensor": (lambda m, tmp: drop_tensor(m, LAYER1_UP), f"missing tensor {LAYER1_UP}"),
    "nan-weight": (lambda m, tmp: change_tensor(m, LAYER1_UP, nan_at), f"tensor {LAYER1_UP} contains NaN"),
    "inf-weight": (lambda m, tmp: change_tensor(m, "model.layers.2.self_attn.o_proj.weight",
                                                lambda t: nan_at(t, float("inf"))),
                   "tensor model.layers.2.self_attn.o_proj.weight contains Inf"),
    "nan-embedding": (lambda m, tmp: change_tensor(m, "model.embed_tokens.weight", lambda t: t * float("nan")),
                      "tensor model.embed_tokens.weight contains NaN"),
    "overflowing-activations": (lambda m, tmp: [change_tensor(m, f"model.layers.1.mlp.{p}_proj.weight",
                                                              lambda t: t * 1e20) for p in ("gate", "up")],
                                r"layer 1 produced (NaN|Inf) activations"),
    "sparsity-one": (lambda m, tmp: {"--sparsity": 1.0}, r"--sparsity must be in \[0, 1\), got 1.0"),
    "sparsity-negative": (lambda m, tmp: {"--sparsity": -0.1}, r"--sparsity must be in \[0, 1\)"),
    "sparsity-removes-every-head": (lambda m, tmp: {"--sparsity": 0.95},
                                    "would remove every attention head of each block; this model allows at most 0.92"),
    "calib-missing": (lambda m, tmp: {"--calib": tmp / "nope.txt"}, "text file not found"),
    "calib-empty": (lambda m, tmp: {"--calib": text_file(tmp, "")}, "text file is empty"),
    "calib-blank": (lambda m, tmp: {"--calib": text_file(tmp, " \n\n\t ")}, "text file is empty"),
    "calib-too-short": (lambda m, tmp: {"--calib": text_file(tmp, "Once upon a time there was a cat.")},
                        r"calibration text has \d+ tokens; --samples 4 x --seq-len 32 needs 124"),
    "zero-samples": (lambda m, tmp: {"--samples": 0}, "--samples must be >= 1"),
    "seq-len-past-max-positions": (lambda m, tmp: {"--seq-len": 1024},
                                   "--seq-len 1024 exceeds max_position_embeddings 512; use at most 512"),
    "out-under-a-file": (lambda m, tmp: {"--out": a_file(tmp) / "out"}, "cannot write to --out .*: Not a directory"),
    "out-is-a-file": (lambda m, tmp: {"--out": a_file(tmp)}, "--out .* is a file; --out needs a folder"),
    "out-is-input": (lambda m, tmp: {"--out": m}, "is the input folder"),
    "out-is-input-via-symlink": (lambda m, tmp: {"--out": link_to(tmp, m)}, "is the input folder"),
    "cache-dir-is-input": (lambda m, tmp: {"--cache-dir": m}, "--cache-dir .* is the input folder"),
    "unknown-device": (lambda m, tmp: {"--device": "tpu"}, "unsupported device 'tpu'"),
    "unknown-method": (lambda m, tmp: {"--method": "oracle"}, "unknown --method 'oracle'"),
}


def run_refused(model: Path, out: Path, overrides: dict, pattern: str):
    """`run` with `overrides` is refused in one line matching `pattern`, leaving the inputs as they
    were and no finished output behind."""
    args = {"--shards": model, "--out": out, "--calib": CALIB, "--samples": 4, "--seq-len": 32, "--sparsity": 0.3}
    args.update(overrides)
    inputs = [model, Path(args["--calib"]).parent]
    before = [sha256_tree(p) for p in inputs]
    r = invoke("run", "--quiet", *(x for kv in args.items() for x in kv))
    refused(r, pattern)
    assert [sha256_tree(p) for p in inputs] == before, "the input folder was modified"
    out = Path(args["--out"])
    if out.is_dir() and not out.samefile(model):
        assert not (out / "model.safetensors.index.json").exists()
        journal = out / ".streamprune" / "journal.json"
        assert not journal.exists() or not json.loads(journal.read_text())["complete"]
    return r


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_cleanly(pristine, tmp_path, case):
    change, pattern = CASES[case]
    model = tmp_path / "in"
    shutil.copytree(pristine, model)
    overrides = change(model, tmp_path)
    run_refused(model, tmp_path / "out", overrides if isinstance(overrides, dict) else {}, pattern)


def test_not_enough_free_disk_is_refused_up_front(pristine, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run_refused(pristine, tmp_path / "out", {}, r"not enough free disk in .*: this run needs about "
                    r"[\d.]+ MiB \(output [\d.]+ MiB, activation cache [\d.]+ MiB\), 0.0 MiB free")
    assert not list((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_refused(pristine, tmp_path):
    run_refused(pristine, tmp_path / "out", {"--device": "cuda"},
                "--device cuda requested but no CUDA GPU is available")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_folder_is_refused(pristine, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        run_refused(pristine, tmp_path / "ro" / "out", {}, "cannot write to --out .*: Permission denied")
    finally:
        (tmp_path / "ro").chmod(0o700)
