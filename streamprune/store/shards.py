"""Safetensors I/O: a header index of the input shards (name -> file, dtype, shape, byte range),
lazy loading of a few tensors at a time, and a streaming, crash-safe shard writer."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import StreamPruneError
from .faults import fault_point
from .fsutil import atomic_write

FINITE_CHUNK = 1 << 24  # elements checked for NaN/Inf at a time, so the check needs little extra memory

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
# Bits per element of every dtype safetensors knows (safetensors/src/tensor.rs, Dtype::bitsize).
# Only DTYPES can be pruned; the others may appear in tensors the run does not need.
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
MAX_HEADER = 100_000_000  # safetensors' own limit (tensor.rs MAX_HEADER_SIZE)
MAX_JSON = 100_000_000  # config.json and the index: far above any real one
USIZE_MAX = 2**64 - 1  # safetensors reads shapes and offsets as usize
COPY_CHUNK = 64 * 1024 * 1024
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


# ---- input files: regular files only, never a blocking open ----

def file_kind(mode: int) -> str:
    return next((what for test, what in FILE_KINDS if test(mode)), "not a regular file")


def is_input_file(path: Path) -> bool:
    """True for a regular file (through symlinks), False when nothing is there. Refuses a FIFO,
    a device, a socket or a folder: reading one blocks forever or never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StreamPruneError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the name
        raise StreamPruneError(f"invalid file name {str(path)!r}") from None
    if not stat.S_ISREG(mode):
        raise StreamPruneError(f"{path} is {file_kind(mode)}, not a regular file")
    return True


def open_input(path: Path) -> BinaryIO:
    """Open a regular input file for reading (FileNotFoundError when there is none). O_NONBLOCK,
    so that even a FIFO put there after is_input_file looked cannot block the open (fstat then
    refuses it); it stays set, which changes nothing for a regular file on a disk."""
    is_input_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StreamPruneError(f"cannot read {path}: {e.strerror or e}") from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise StreamPruneError(f"{path} is {file_kind(mode)}, not a regular file")
    return f


def check_folder_files(folder: Path) -> None:
    """Every entry of a model folder is a regular file or a folder (through symlinks): the
    tokenizer loader and the copy of the other files would block on a FIFO or read a device
    forever. Dangling symlinks are left to whoever needs the file."""
    for entry in sorted(Path(folder).iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise StreamPruneError(f"{entry} is {file_kind(mode)}, not a regular file; remove it from the model folder")


def parse_json(raw: bytes, invalid: str, **hooks):
    """JSON from UTF-8 bytes, any failure as one StreamPruneError starting with `invalid`."""
    try:
        return json.loads(raw.decode("utf-8"), **hooks)
    except UnicodeDecodeError as e:
        raise StreamPruneError(f"{invalid}: not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise StreamPruneError(f"{invalid}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
        raise StreamPruneError(f"{invalid}: {str(e).splitlines()[0][:200]}") from None


def read_json(path: Path, invalid: str):
    """A JSON file (config.json, the index) of at most MAX_JSON bytes."""
    with open_input(path) as f:
        raw = f.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise StreamPruneError(f"{invalid}: larger than {MAX_JSON} bytes")
    return parse_json(raw, invalid)


# ---- safetensors headers, checked with the rules safetensors applies when it opens a file ----

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


def first_bad_value(t: torch.Tensor) -> str | None:
    """'NaN' or 'Inf' if t holds one (checked in chunks), else None."""
    flat = t.detach().reshape(-1)
    if not flat.is_floating_point():
        return None
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start:start + FINITE_CHUNK]
        # min and max carry a NaN or an Inf through; about 10x faster than isfinite().all() on a CPU
        if not torch.isfinite(torch.stack(torch.aminmax(chunk))).all():
            return "NaN" if torch.isnan(chunk).any() else "Inf"
    return None


def check_finite_tensor(t: torch.Tensor, name: str) -> None:
    """Refuse the input model when its tensor `name` (or a part of it, `t`) holds a NaN or an Inf."""
    bad = first_bad_value(t)
    if bad:
        raise StreamPruneError(f"tensor {name} contains {bad} values; the input model is damaged")
