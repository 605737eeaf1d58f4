"""Safetensors headers, checked with the rules safetensors applies when it opens a file: dtypes,
shapes and byte ranges of every tensor, without reading a weight."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import StreamPruneError
from .input_files import open_input, parse_json

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


DTYPE_CODES = {v: k for k, v in DTYPES.items()}


ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


# Bits per element of every dtype safetensors knows (safetensors/src/tensor.rs, Dtype::bitsize).
# Only DTYPES can be pruned; the others may appear in tensors the run does not need.
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


MAX_HEADER = 100_000_000  # safetensors' own limit (tensor.rs MAX_HEADER_SIZE)


USIZE_MAX = 2**64 - 1  # safetensors reads shapes and offsets as usize


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors code: F32, F16, BF16 (others only in tensors the run does not need)
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def no_duplicates(pairs: list) -> dict:
    """object_pairs_hook: json.loads would silently keep the last of two equal keys."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def usize_literal(digits: str) -> int:
    """parse_int: shapes and offsets are usize, so a longer literal is refused before Python's
    own digit limit answers with a hint about sys.set_int_max_str_digits."""
    if len(digits.lstrip("-")) > 20:
        raise ValueError(f"integer {digits[:24]}... does not fit in 64 bits")
    return int(digits)


def is_usize(v) -> bool:
    return type(v) is int and 0 <= v <= USIZE_MAX


def header_bytes(path: Path) -> tuple[bytes, int]:
    """The header's JSON bytes and the file size."""
    try:
        with open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise StreamPruneError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise StreamPruneError(f"{path.name}: corrupt safetensors header (length {n}, file {size} bytes"
                                       f"{', safetensors reads at most %d' % MAX_HEADER if n > MAX_HEADER else ''})")
            raw = f.read(n)
            if len(raw) < n:
                raise StreamPruneError(f"{path.name}: truncated safetensors header ({len(raw)} of {n} bytes)")
            return raw, size
    except FileNotFoundError:
        raise StreamPruneError(f"missing shard {path}") from None


def tensor_bytes_needed(shape: tuple[int, ...], dtype: str) -> int | None:
    """itemsize x prod(shape), or None where safetensors' usize arithmetic overflows or a
    sub-byte dtype does not end on a byte boundary."""
    n = 1
    for s in shape:
        n *= s
        if n > USIZE_MAX:
            return None
    bits = n * DTYPE_BITS[dtype]
    return bits // 8 if bits <= USIZE_MAX and bits % 8 == 0 else None


def tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    bad = f"{path.name}: corrupt safetensors header (tensor {name}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise StreamPruneError(f"{bad}: needs dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise StreamPruneError(f"{path.name}: tensor {name} has unknown dtype {dtype!r} (safetensors cannot open it)")
    if not (isinstance(shape, list) and all(is_usize(s) for s in shape)):
        raise StreamPruneError(f"{bad}: shape {shape!r} is not a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_usize(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise StreamPruneError(f"{bad}: data_offsets {offsets!r} are not [start, end] with start <= end)")
    shape, (a, b) = tuple(shape), offsets
    need = tensor_bytes_needed(shape, dtype)
    if need is None:
        raise StreamPruneError(f"{bad}: {dtype} {list(shape)} has no valid byte size)")
    if b - a != need:
        raise StreamPruneError(f"{bad} holds {b - a} bytes, {dtype} {list(shape)} needs {need})")
    return TensorInfo(path, dtype, shape, data_start + a, data_start + b)


def check_metadata(path: Path, metadata) -> None:
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise StreamPruneError(f"{path.name}: corrupt safetensors header (__metadata__ must map strings to strings)")


def check_layout(path: Path, infos: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors' byte ranges follow each other without gap or overlap and cover the data to
    the end of the file, as safetensors requires."""
    pos = data_start
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.end > size:
            raise StreamPruneError(f"{path.name}: truncated (tensor {name} ends past end of file)")
        if info.start != pos:
            raise StreamPruneError(f"{path.name}: corrupt safetensors header (tensor {name} starts at data byte "
                                   f"{info.start - data_start}, expected {pos - data_start}: tensors overlap or "
                                   "leave a gap)")
        pos = info.end
    if pos != size:
        raise StreamPruneError(f"{path.name}: corrupt safetensors header ({size - pos} bytes after the last tensor)")


def confirm_with_safetensors(path: Path) -> None:
    """Let safetensors itself open the file (header only, memory-mapped), so that whatever it
    would refuse later is refused now, before anything is written."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise StreamPruneError(f"{path.name}: corrupt safetensors header ({str(e).splitlines()[0][:200]})") from None


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header, every tensor of it, without reading tensor data."""
    raw, size = header_bytes(path)
    header = parse_json(raw, f"{path.name}: corrupt safetensors header", object_pairs_hook=no_duplicates,
                        parse_constant=no_constant, parse_int=usize_literal)
    if not isinstance(header, dict):
        raise StreamPruneError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    check_metadata(path, header.pop("__metadata__", None))
    data_start = 8 + len(raw)
    infos = {name: tensor_info(path, name, entry, data_start) for name, entry in header.items()}
    check_layout(path, infos, data_start, size)
    confirm_with_safetensors(path)
    return infos
