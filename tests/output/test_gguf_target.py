"""`export --gguf` writes only what is its to write: it refuses, before any work and in one line, the
model's own files, any file that is not a GGUF file, and something in the way of its temporary file;
it replaces an existing GGUF file saying so; the unfinished file a killed export left is removed by
the next export. Every refusal leaves every file's bytes as they were."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from streamprune.output.gguf_target import MAGIC, partial_path
from tests.harness import invoke, refused, run_cli
from tests.models import TINYSTORIES, save_tiny_model

DEMO = TINYSTORIES / "stories260K"


def digests(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def model(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO, tmp_path / "model"))


def export(model: Path, gguf: Path, *extra):
    return invoke("export", model, "--gguf", gguf, "--quiet", *extra)


def refused_unchanged(model: Path, gguf: Path, *patterns: str) -> None:
    before = digests(model, gguf.parent)
    refused(export(model, gguf), *patterns)
    assert digests(model, gguf.parent) == before  # (a new file, the temporary one too, would be a new key)


@pytest.mark.parametrize("name", ["model-00001-of-00006.safetensors", "config.json", "tokenizer.json",
                                  "model.safetensors.index.json"])
def test_the_models_own_files_are_refused(model, name):
    refused_unchanged(model, model / name, f"is the model's own file {name}")


def test_a_link_to_the_models_file_is_refused(model, tmp_path):
    (tmp_path / "link.gguf").symlink_to(model / "config.json")
    os.link(model / "tokenizer.json", tmp_path / "hard.gguf")
    refused_unchanged(model, tmp_path / "link.gguf", "is the model's own file config.json")
    refused_unchanged(model, tmp_path / "hard.gguf", "is the model's own file tokenizer.json")


def test_a_file_that_is_not_gguf_is_refused(model, tmp_path):
    thesis = tmp_path / "work" / "thesis.txt"
    thesis.parent.mkdir()
    thesis.write_text("four years of work")
    refused_unchanged(model, thesis, "exists and is not a GGUF file")
    (thesis.parent / "empty.gguf").write_bytes(b"")
    refused_unchanged(model, thesis.parent / "empty.gguf", "exists and is not a GGUF file")


@pytest.mark.slow  # (exports a model)
def test_a_gguf_file_in_the_model_folder_is_refused_too(model, tmp_path):
    assert export(model, tmp_path / "m.gguf").exit_code == 0
    shutil.copy(tmp_path / "m.gguf", model / "m.gguf")
    refused_unchanged(model, model / "m.gguf", "is the model's own file m.gguf")


@pytest.mark.slow  # (exports a model)
def test_an_existing_gguf_file_is_replaced_with_a_line(model, tmp_path):
    gguf = tmp_path / "m.gguf"
    r = export(model, gguf, "--type", "f32")
    assert r.exit_code == 0 and "replacing" not in r.stderr
    r = export(model, gguf, "--type", "f16")
    assert r.exit_code == 0 and f"replacing the existing GGUF file {gguf}" in r.stderr
    assert "F16" in r.stdout and gguf.read_bytes()[:4] == MAGIC


@pytest.mark.slow
def test_a_killed_export_leaves_no_target_and_the_next_one_removes_its_file(model, tmp_path):
    gguf = tmp_path / "m.gguf"
    r = run_cli(["export", str(model), "--gguf", str(gguf), "--quiet"], fault="gguf_mid_write:5")
    assert r.returncode == -9
    assert not gguf.exists() and partial_path(gguf).read_bytes()[:4] == MAGIC
    r = run_cli(["export", str(model), "--gguf", str(gguf), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert f"removed {partial_path(gguf).name}, left by an export that was interrupted" in r.stderr
    assert not partial_path(gguf).exists() and gguf.read_bytes()[:4] == MAGIC


def test_something_else_where_the_temporary_file_goes_is_refused(model, tmp_path):
    gguf = tmp_path / "m.gguf"
    partial_path(gguf).write_text("not ours")
    refused_unchanged(model, gguf, "is in the way of the export")
    assert partial_path(gguf).read_text() == "not ours"


def tiny_with(folder: Path, value: float) -> Path:
    """A tiny Llama with the demo tokenizer and one weight of block 0's up_proj set to `value`."""
    from transformers import AutoModelForCausalLM
    save_tiny_model(folder, "llama", tokenizer_from=DEMO, vocab=512, rope_parameters=None, shard_size="10MB")
    m = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[3, 5] = value
    m.save_pretrained(folder)
    return folder


@pytest.mark.slow  # (exports a model)
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_values_beyond_f16_keep_their_tensor_in_f32(tmp_path, kind):
    from gguf import GGUFReader
    folder = tiny_with(tmp_path / "big", 1e9)
    r = export(folder, tmp_path / "m.gguf", "--type", kind)
    assert r.exit_code == 0, r.output
    assert "blk.0.ffn_up.weight: F32 (values up to 1e+09 are beyond" in r.stdout
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == "F32" and types["blk.1.ffn_up.weight"] == kind.upper()


@pytest.mark.slow  # (exports a model)
def test_nan_is_refused(tmp_path):
    folder = tiny_with(tmp_path / "nan", float("nan"))
    refused(export(folder, tmp_path / "m.gguf"), "blk.0.ffn_up.weight holds NaN or inf")
    assert not (tmp_path / "m.gguf").exists() and not partial_path(tmp_path / "m.gguf").exists()
