"""Safetensors I/O: a header index of the input shards (name -> file, dtype, shape, byte range),
lazy loading of a few tensors at a time, and a streaming, crash-safe shard writer."""

from __future__ import annotations

import json
import struct
from math import prod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch
from safetensors import safe_open

from .errors import StreamPruneError
from .faults import fault_point
from .fsutil import atomic_write

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors code: F32, F16, BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header without reading any tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise StreamPruneError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise StreamPruneError(f"{path.name}: corrupt safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StreamPruneError(f"missing shard {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StreamPruneError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise StreamPruneError(f"{path.name}: corrupt safetensors header")
    header.pop("__metadata__", None)
    infos = {}
    for name, h in header.items():
        try:
            dtype, shape, (a, b) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise StreamPruneError(f"{path.name}: corrupt safetensors header entry for {name}") from None
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b):
            raise StreamPruneError(f"{path.name}: corrupt safetensors header (data offsets of {name})")
        if 8 + n + b > size:
            raise StreamPruneError(f"{path.name}: truncated (tensor {name} ends past end of file)")
        infos[name] = TensorInfo(path, dtype, shape, 8 + n + a, 8 + n + b)
    return infos


class ShardIndex:
    """Where every tensor of a Hugging Face model folder lives, from headers alone."""

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors

    @classmethod
    def open(cls, folder: Path) -> "ShardIndex":
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise StreamPruneError(f"{index} is not a valid safetensors index") from None
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise StreamPruneError(f"no model.safetensors or model.safetensors.index.json in {folder}")
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            tensors.update(read_header(folder / name))
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in tensors or tensors[name].file.name != file:
                    raise StreamPruneError(f"tensor {name} listed in the index is not in {file}")
        return cls(folder, tensors)

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor is present with the expected shape and a supported dtype."""
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise StreamPruneError(f"missing tensor {name}")
            if info.shape != shape:
                raise StreamPruneError(f"tensor {name} has shape {list(info.shape)}, config says {list(shape)}")
            if info.dtype not in DTYPES:
                raise StreamPruneError(f"tensor {name} has unsupported dtype {info.dtype} (F32, F16, BF16 only)")
            if info.nbytes != ITEMSIZE[info.dtype] * prod(shape):
                raise StreamPruneError(f"{info.file.name}: corrupt safetensors header ({name} holds {info.nbytes} "
                                       f"bytes, {info.dtype} {list(shape)} needs {ITEMSIZE[info.dtype] * prod(shape)})")

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
        with open(info.file, "rb") as f:
            f.seek(info.start)
            left = info.nbytes
            while left:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise StreamPruneError(f"{info.file.name}: truncated while copying {name}")
                left -= len(chunk)
                yield chunk


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: either a tensor, or raw bytes copied from an input shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    source: ShardIndex | None = None

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "OutTensor":
        return cls(name, DTYPE_CODES[t.dtype], tuple(t.shape), tensor=t)

    @classmethod
    def copy(cls, name: str, index: ShardIndex) -> "OutTensor":
        info = index.tensors[name]
        return cls(name, info.dtype, info.shape, source=index)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    def chunks(self) -> Iterable[bytes]:
        if self.tensor is not None:
            return [tensor_bytes(self.tensor)]
        return self.source.raw_chunks(self.name)


def write_safetensors(path: Path, tensors: list[OutTensor]) -> None:
    """Write a safetensors file atomically, streaming copied tensors in chunks. Deterministic:
    tensors are laid out in name order, header keys sorted."""
    tensors = sorted(tensors, key=lambda t: t.name)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        fault_point("shard_mid_write")
        for t in tensors:
            for chunk in t.chunks():
                f.write(chunk)

    atomic_write(path, write)


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"
