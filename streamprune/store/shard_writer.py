"""The output shards: a deterministic, crash-safe safetensors writer that streams tensors, or
bytes copied from an input shard, in chunks."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from .faults import fault_point
from .fsutil import atomic_write
from .safetensors_header import DTYPE_CODES, ITEMSIZE
from .shards import ShardIndex


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
