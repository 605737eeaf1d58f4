"""Which files of an input model folder a run reads or copies, and their fingerprint: what a
resumed run checks has not changed since the run began."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from .runlog import LOG_FILE
from .shards import INDEX

# Written by streamprune itself into the output (never copied from the input).
OUTPUT_FILES = ("config.json", INDEX, "report.json", "README.md", LOG_FILE)
# Never copied into the output: weights in any format (the dense ones would sit beside the pruned
# shards) and code (streamprune neither runs nor passes on code shipped with a model).
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".msgpack",
                       ".onnx", ".npz", ".npy", ".pkl", ".pickle", ".py", ".pyc", ".so", ".index.json")


def companion_files(folder: Path) -> list[Path]:
    """The input's small files that go into the output as they are: tokenizer, generation config,
    license, README... (regular files at the top of the folder, not hidden)."""
    return [p for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in OUTPUT_FILES
            and not p.name.lower().endswith(NOT_COPIED_SUFFIXES)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_stamp(path: Path) -> str:
    """size, modification time and the sha256 of the header (names, dtypes, shapes, offsets)."""
    st = path.stat()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = f.read(n)
    return f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(header).hexdigest()}"


def input_fingerprint(folder: Path, shard_files) -> dict[str, str]:
    """Keys `input:NAME`. Small files by content; shards by size, mtime and header, since hashing
    every weight would read the whole model again at each start (minutes for a 70B model). Any
    tool that rewrites a shard changes its mtime; one that restores the old mtime and keeps the
    size and header while changing weights is not detected."""
    folder = Path(folder)
    fp = {f"input:{p.name}": sha256_file(p) for p in companion_files(folder)}
    for name in ("config.json", INDEX):
        if (folder / name).is_file():
            fp[f"input:{name}"] = sha256_file(folder / name)
    for path in sorted(set(shard_files)):
        fp[f"input:{Path(path).name}"] = shard_stamp(Path(path))
    return fp
