"""The input shards: a header index of a model folder (name -> file, dtype, shape, byte range,
checked against the config) and lazy loading of a few tensors, rows or raw bytes at a time. The
headers are read by safetensors_header.py; the output is written by shard_writer.py."""

from __future__ import annotations

import os
import re
from math import prod
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..errors import StreamPruneError
from .faults import fault_point
from .finite import FINITE_CHUNK, check_finite_tensor
from .input_files import check_folder_files, is_input_file, open_input, read_json
from .safetensors_header import DTYPES, TensorInfo, read_header

COPY_CHUNK = 64 * 1024 * 1024

INDEX = "model.safetensors.index.json"
LAYER = re.compile(r"model\.layers\.(\d+)\.")


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name, a plain name inside the model
    folder (no path separator, no '..')."""
    invalid = f"{index} is not a valid safetensors index"
    data = read_json(index, invalid)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise StreamPruneError(f"{invalid}: needs a non-empty object weight_map")
    for name, file in weight_map.items():
        if not (isinstance(file, str) and file not in ("", ".", "..") and "/" not in file and "\\" not in file
                and os.sep not in file and "\0" not in file):
            raise StreamPruneError(f"{invalid}: tensor {name} is in {file!r}, not a file name in the model folder")
    return weight_map


def layer_numbers(names) -> set[int]:
    return {int(m.group(1)) for m in map(LAYER.match, names) if m}


class ShardIndex:
    """Where every tensor of a Hugging Face model folder lives, from headers alone."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors

    @classmethod
    def open(cls, folder: Path) -> "ShardIndex":
        folder = Path(folder)
        check_folder_files(folder)
        index = folder / INDEX
        if is_input_file(index):
            weight_map = read_weight_map(index)
            files = sorted(set(weight_map.values()))
        elif is_input_file(folder / "model.safetensors"):
            weight_map, files = None, ["model.safetensors"]
        else:
            raise StreamPruneError(f"no model.safetensors or {INDEX} in {folder}")
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            for tensor, info in read_header(folder / name).items():
                if tensor in tensors:
                    raise StreamPruneError(f"tensor {tensor} is in both {tensors[tensor].file.name} and {name}")
                tensors[tensor] = info
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in tensors or tensors[name].file.name != file:
                    raise StreamPruneError(f"tensor {name} listed in the index is not in {file}")
        return cls(folder, tensors)

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """The shards hold the layers the config implies, and every expected tensor is present
        with the expected shape and a supported dtype."""
        self.check_layers(expected)
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise StreamPruneError(f"missing tensor {name}")
            if info.shape != shape:
                raise StreamPruneError(f"tensor {name} has shape {list(info.shape)}, config says {list(shape)}")
            if info.dtype not in DTYPES:
                raise StreamPruneError(f"tensor {name} has unsupported dtype {info.dtype} (F32, F16, BF16 only)")

    def check_layers(self, expected: dict[str, tuple[int, ...]]) -> None:
        """config.json's num_hidden_layers against the decoder layers the shards hold: a config
        that claims fewer layers would silently drop the others, one that claims more fails later."""
        want, have = layer_numbers(expected), layer_numbers(self.tensors)
        if have - want:
            raise StreamPruneError(f"config.json has num_hidden_layers {len(want)}, but the shards hold layers "
                                   f"up to {max(have)}")
        if want - have:
            raise StreamPruneError(f"config.json has num_hidden_layers {len(want)}, but the shards hold no tensor "
                                   f"of layer {min(want - have)}")

    def check_finite(self, names: list[str]) -> None:
        """The named tensors (those copied byte for byte into the output: embedding, final norm,
        lm_head) hold no NaN or Inf; read in chunks of rows, so it costs little memory."""
        for name in names:
            for part in self.row_chunks(name, FINITE_CHUNK):
                check_finite_tensor(part, name)

    def row_chunks(self, name: str, elements: int) -> Iterator[torch.Tensor]:
        """Tensor `name` in consecutive slices of whole rows, about `elements` at a time."""
        shape = self.tensors[name].shape
        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            if len(shape) < 2:
                yield f.get_tensor(name)
                return
            sl, step = f.get_slice(name), max(1, elements // max(1, prod(shape[1:])))
            for lo in range(0, shape[0], step):
                yield sl[lo:lo + step]

    def load(self, names: dict[str, str], device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read the named tensors (short name -> stored name), memory-mapped, one file at a time."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for short, name in names.items():
            by_file.setdefault(self.tensors[name].file, []).append((short, name))
        out = {}
        for file, pairs in by_file.items():
            fault_point("shard_read")
            with safe_open(str(file), framework="pt") as f:
                for short, name in pairs:
                    t = f.get_tensor(name)
                    out[short] = t.to(device=device, dtype=dtype or t.dtype)
        return out

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (sorted, unique) of a 2-D tensor, reading contiguous runs only."""
        ids = ids.tolist()
        parts, i = [], 0
        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            sl = f.get_slice(name)
            while i < len(ids):
                j = i
                while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
                    j += 1
                parts.append(sl[ids[i]:ids[j] + 1])
                i = j + 1
        return torch.cat(parts)

    def raw_chunks(self, name: str) -> Iterator[bytes]:
        info = self.tensors[name]
        with open_input(info.file) as f:
            f.seek(info.start)
            left = info.nbytes
            while left:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise StreamPruneError(f"{info.file.name}: truncated while copying {name}")
                left -= len(chunk)
                yield chunk


