"""Which input files a run copies and the input's fingerprint (store/modelfiles.py)."""

import os

from safetensors.torch import load_file, save_file

from streamprune.store.modelfiles import companion_files, input_fingerprint
from tests.models import save_tiny_model

COPIED = ["LICENSE", "generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
NOT_COPIED = ["config.json", "README.md", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "consolidated.PTH", "model.gguf", "modeling_custom.py", "configuration_custom.pyc", "tf_model.h5",
              "flax_model.msgpack", "model.onnx", ".gitattributes", "streamprune.log", "report.json"]


def test_companion_files_are_the_small_files_never_code_or_weights(tmp_path):
    for name in COPIED + NOT_COPIED:
        (tmp_path / name).write_text("x")
    (tmp_path / "subfolder").mkdir()
    (tmp_path / "subfolder" / "tokenizer.model").write_text("x")
    assert [p.name for p in companion_files(tmp_path)] == COPIED
    assert all(p.parent == tmp_path for p in companion_files(tmp_path))


def test_input_fingerprint_changes_when_a_shard_or_a_small_file_changes(tmp_path):
    folder = save_tiny_model(tmp_path / "in", "llama", layers=1, shard_size="10GB")
    (folder / "tokenizer.json").write_text("{}")
    shard = folder / "model.safetensors"
    fp = input_fingerprint(folder, [shard, shard])
    assert set(fp) == {"input:config.json", "input:generation_config.json", "input:tokenizer.json",
                       "input:model.safetensors"}
    size, _, header = fp["input:model.safetensors"].split(":")
    assert int(size) == shard.stat().st_size and len(header) == 64
    assert input_fingerprint(folder, [shard]) == fp  # the same files: the same fingerprint

    tensors = load_file(shard)  # the same names, shapes and size, another weight: a new mtime
    tensors["model.norm.weight"][0] += 1
    save_file(tensors, shard, metadata={"format": "pt"})
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = input_fingerprint(folder, [shard])
    assert changed["input:model.safetensors"] != fp["input:model.safetensors"]
    assert {k: v for k, v in changed.items() if k != "input:model.safetensors"} == \
        {k: v for k, v in fp.items() if k != "input:model.safetensors"}

    (folder / "tokenizer.json").write_text('{"changed": true}')
    assert input_fingerprint(folder, [shard])["input:tokenizer.json"] != fp["input:tokenizer.json"]
