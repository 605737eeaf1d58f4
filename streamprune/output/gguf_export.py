"""Any model folder streamprune reads or writes, as one GGUF file llama.cpp runs.

A model is written as the family's own llama.cpp architecture (`llama` for Llama and Mistral, `qwen2`,
`qwen3`), as llama.cpp's converter writes it, where that architecture holds its shapes and tensors;
else as `deci` (the architecture of NVIDIA's Nemotron-NAS models), which builds every layer with its
own head, KV-head and neuron counts (`head_count`, `head_count_kv`, `feed_forward_length` as per-layer
arrays); what neither runs exactly is refused before anything is written (gguf_archs.py). Values a
type cannot hold (beyond f16's range) keep that tensor in F32; NaN or inf is refused.

Memory: one tensor at a time (the embedding and lm_head in chunks of rows), never the model.
The file appears under its name only when complete (written beside it, then renamed), and only a
GGUF file is ever replaced (gguf_target.py)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..arch.families import hf_config, rope_type, rotary_embedding
from ..arch.model import open_model
from ..arch.spec import EMBED, FINAL_NORM, LM_HEAD, Architecture, BlockSpec
from ..config import GGUF_TYPES
from ..errors import StreamPruneError
from ..store.faults import fault_point
from ..store.fsutil import fsync_dir
from .gguf_archs import STOCK, WORKS, LlamaCppArch, choose
from .gguf_target import check_target, partial_path
from .gguf_vocab import GGUFVocab, read_vocab

CHUNK_ELEMENTS = 16 * 2**20  # rows of the embedding and lm_head converted at a time

# --type -> (GGML type name, llama_ftype number written as general.file_type)
TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
         "q5_0": ("Q5_0", 8), "q4_0": ("Q4_0", 2)}
assert tuple(TYPES) == GGUF_TYPES
SMALL_TYPES = ("q5_0", "q4_0")  # below 8 bits: lm_head stays q8_0, as llama.cpp's own recipes keep it higher
# the largest |value| each type holds: f16's 65504, times the largest quantized integer for the types whose
# blocks keep an f16 scale
LARGEST = {"F16": 65504.0, "Q8_0": 65504.0 * 127, "Q5_0": 65504.0 * 16, "Q4_0": 65504.0 * 8}
ROW_ADVICE = ("to quantize every matrix: prune with --row-multiple 32 (the default of streamprune run), which keeps "
              "neuron counts and query heads x head_dim multiples of 32")

GGUF_NAMES = {
    "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
    "o": "attn_output.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "o_bias": "attn_output.bias", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "mlp_norm": "ffn_norm.weight", "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
    "gate_bias": "ffn_gate.bias", "up_bias": "ffn_up.bias", "down_bias": "ffn_down.bias",
}


@dataclass(frozen=True)
class Tensor:
    """One tensor of the GGUF file: its name, shape (rows, row length), GGML type, and how to read it."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    read: Callable[[], Iterator[torch.Tensor]]  # yields consecutive chunks of whole rows
    fallback: str | None = None  # why it is not in the requested type


@dataclass(frozen=True)
class ExportResult:
    path: Path
    architecture: str
    ggml_type: str
    tensors: int
    bytes: int
    fallbacks: list[tuple[str, str, str]]  # (tensor, type written, why)

    @property
    def advice(self) -> str | None:
        """How to avoid the fallbacks of rows a quantized type cannot split, when there are some."""
        return ROW_ADVICE if any("do not split" in why for _, _, why in self.fallbacks) else None


class OutOfRange(Exception):
    """A tensor holds values its GGML type cannot (the export starts over with it in F32)."""

    def __init__(self, name: str, largest: float):
        super().__init__(name)
        self.name, self.largest = name, largest


def gguf_architecture(arch: Architecture, rope_factors: bool = False) -> LlamaCppArch:
    """The llama.cpp architecture that computes this model exactly, or a one-line refusal."""
    for i, b in enumerate(arch.blocks):
        window = arch.config.get("max_position_embeddings") or 0
        if b.sliding_window is not None and b.sliding_window < window:
            raise StreamPruneError(f"block {i} attends within a sliding window of {b.sliding_window} tokens; "
                                   f"llama.cpp's {STOCK[arch.model_type]} attends to all; {WORKS}")
    return choose(arch, rope_factors)


def rope_scaling(config: dict, head_dim: int) -> tuple[float, torch.Tensor | None]:
    """(linear factor, llama3 frequency factors) of the rotary embedding, as llama.cpp takes them:
    `rope.scaling.factor` for linear scaling, a `rope_freqs` tensor (one divisor per frequency,
    transformers' own frequencies against the default ones) for llama3. Other kinds are refused."""
    cfg = hf_config(config)
    kind = rope_type(cfg)
    if kind == "default":
        return 1.0, None
    params = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
    if kind == "linear":
        return float(params["factor"]), None
    if kind != "llama3":
        raise StreamPruneError(f"rope_type {kind!r} has no exact llama.cpp equivalent here; exported: default, "
                               "linear and llama3 rotary embeddings")
    rotary = rotary_embedding(config)
    default = 1.0 / (rope_theta(cfg) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim))
    return 1.0, (default / rotary.inv_freq.double()).float()


def rope_theta(cfg) -> float:
    params = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (or their bias) from transformers' half-split rotary layout to the adjacent
    pairs of llama.cpp's normal rope, head by head: (n_heads*D, ...) -> same shape."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_type(name: str, shape: tuple[int, ...], wanted: str) -> tuple[str, str | None]:
    """(GGML type, why it is not `wanted`) for one tensor: vectors stay F32 (as llama.cpp keeps
    norms and biases); a block-quantized type needs rows that split into its blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    if len(shape) == 1:
        return "F32", None
    ggml, _ = TYPES[wanted]
    if wanted in SMALL_TYPES and name == "output.weight":
        ggml, why = "Q8_0", "lm_head kept at 8 bits"
    else:
        why = None
    block = GGML_QUANT_SIZES[GGMLQuantizationType[ggml]][0]
    if shape[-1] % block:
        return "F16", f"rows of {shape[-1]} do not split into {ggml}'s blocks of {block}"
    return ggml, why


def plan_tensors(model, gguf_arch: LlamaCppArch, wanted: str, factors: torch.Tensor | None) -> list[Tensor]:
    """Every tensor of the file in order, with its type; `factors`: rope_scaling's rope_freqs."""
    arch, index = model.arch, model.index
    tensors: list[Tensor] = []

    def add(name: str, shape, read):
        ggml, why = tensor_type(name, tuple(shape), wanted)
        tensors.append(Tensor(name, tuple(shape), ggml, read, why))

    add("token_embd.weight", index.tensors[EMBED].shape, lambda: index.row_chunks(EMBED, CHUNK_ELEMENTS))
    if factors is not None:
        add("rope_freqs.weight", factors.shape, lambda: iter([factors]))
    for i, block in enumerate(arch.blocks):
        for short in block.tensor_names():
            name = arch.layer_tensor(i, short)
            add(f"blk.{i}.{GGUF_NAMES[short]}", index.tensors[name].shape,
                _block_reader(index, name, short, block, gguf_arch.paired_rope))
    add("output_norm.weight", index.tensors[FINAL_NORM].shape, lambda: iter([index.load({"w": FINAL_NORM})["w"]]))
    if not arch.tied:
        add("output.weight", index.tensors[LM_HEAD].shape, lambda: index.row_chunks(LM_HEAD, CHUNK_ELEMENTS))
    return tensors


def _block_reader(index, name: str, short: str, block: BlockSpec, paired: bool):
    heads = {"q": block.n_heads, "q_bias": block.n_heads, "k": block.n_kv, "k_bias": block.n_kv}

    def read():
        t = index.load({short: name})[short]
        if paired and short in heads:
            t = permute_rotary(t, heads[short])
        yield t
    return read


def metadata(writer, arch: Architecture, gguf_arch: LlamaCppArch, vocab: GGUFVocab, wanted: str, name: str,
             factor: float) -> None:
    """The file's key-values; `factor`: rope_scaling's linear factor."""
    from gguf import GGUFValueType
    blocks = arch.blocks
    per_layer = gguf_arch.per_layer_shapes

    def each(f):
        values = [int(f(b)) for b in blocks]
        return values if per_layer else values[0]

    a = gguf_arch.name
    writer.add_string("general.type", "model")
    writer.add_string("general.name", name)
    writer.add_uint32("general.quantization_version", 2)
    writer.add_uint32("general.file_type", TYPES[wanted][1])
    writer.add_uint32(f"{a}.block_count", arch.n_layers)
    writer.add_uint32(f"{a}.context_length", int(arch.config.get("max_position_embeddings") or 2048))
    writer.add_uint32(f"{a}.embedding_length", arch.hidden)
    writer.add_uint32(f"{a}.vocab_size", arch.vocab)
    for key, f in (("feed_forward_length", lambda b: b.intermediate), ("attention.head_count", lambda b: b.n_heads),
                   ("attention.head_count_kv", lambda b: b.n_kv)):
        value = each(f)
        if isinstance(value, list):
            writer.add_key_value(f"{a}.{key}", value, GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)
        else:
            writer.add_uint32(f"{a}.{key}", value)
    head_dim = blocks[0].head_dim
    writer.add_uint32(f"{a}.attention.key_length", head_dim)
    writer.add_uint32(f"{a}.attention.value_length", head_dim)
    writer.add_uint32(f"{a}.rope.dimension_count", head_dim)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(blocks[0].eps))
    writer.add_float32(f"{a}.rope.freq_base", rope_theta(hf_config(arch.config)))
    if factor != 1.0:
        writer.add_string(f"{a}.rope.scaling.type", "linear")
        writer.add_float32(f"{a}.rope.scaling.factor", factor)
    tokenizer_metadata(writer, vocab)


def tokenizer_metadata(writer, vocab: GGUFVocab) -> None:
    from gguf import GGUFValueType
    writer.add_string("tokenizer.ggml.model", vocab.model)
    if vocab.pre:
        writer.add_string("tokenizer.ggml.pre", vocab.pre)
    writer.add_key_value("tokenizer.ggml.tokens", vocab.tokens, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_key_value("tokenizer.ggml.token_type", vocab.types, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    if vocab.scores is not None:
        writer.add_key_value("tokenizer.ggml.scores", vocab.scores, GGUFValueType.ARRAY,
                             sub_type=GGUFValueType.FLOAT32)
    if vocab.merges:
        writer.add_key_value("tokenizer.ggml.merges", vocab.merges, GGUFValueType.ARRAY,
                             sub_type=GGUFValueType.STRING)
    for key, i in vocab.special.items():
        writer.add_uint32(f"tokenizer.ggml.{dict(pad='padding', unk='unknown').get(key, key)}_token_id", i)
    writer.add_bool("tokenizer.ggml.add_bos_token", vocab.add_bos)
    writer.add_bool("tokenizer.ggml.add_eos_token", vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_bool("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_string("tokenizer.chat_template", vocab.chat_template)


def encode(chunk: torch.Tensor, ggml: str, name: str = "") -> np.ndarray:
    """Rows in GGML type `ggml`, as the bytes (or floats) the file holds. NaN or inf is refused; values
    beyond what the type holds raise OutOfRange (never written as inf)."""
    from gguf import GGMLQuantizationType, quants
    x = chunk.detach().to(torch.float32).contiguous().numpy()
    if not np.isfinite(x).all():
        raise StreamPruneError(f"{name} holds NaN or inf values; llama.cpp would compute garbage from them")
    largest = float(np.abs(x).max(initial=0.0))
    if largest > LARGEST.get(ggml, math.inf):
        raise OutOfRange(name, largest)
    if ggml == "F32":
        return x
    if ggml == "F16":
        return x.astype(np.float16)
    return quants.quantize(x, GGMLQuantizationType[ggml])


def nbytes(shape: tuple[int, ...], ggml: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml]]
    return math.prod(shape[:-1]) * shape[-1] // block * size


def export_gguf(folder: Path, out: Path, wanted: str = "f16", progress: Callable[[int], None] | None = None,
                on_total: Callable[[int], None] | None = None,
                notify: Callable[[str], None] | None = None) -> ExportResult:
    """Write the model in `folder` to the GGUF file `out` in type `wanted` (TYPES); `notify(line)` is
    told when an existing GGUF file is replaced or an interrupted export's file removed."""
    if wanted not in TYPES:
        raise StreamPruneError(f"unknown --type {wanted!r}; one of {', '.join(TYPES)}")
    target = check_target(Path(out), Path(folder))
    out, notify = target.path, notify or (lambda line: None)
    model = open_model(folder)
    factor, factors = rope_scaling(model.arch.config, model.arch.blocks[0].head_dim)
    gguf_arch = gguf_architecture(model.arch, factors is not None)
    vocab = read_vocab(model.folder, model.arch.vocab)
    tensors = plan_tensors(model, gguf_arch, wanted, factors)
    if on_total:
        on_total(len(tensors))
    partial = partial_path(out)
    if target.stale_partial:
        target.stale_partial.unlink()
        notify(f"removed {target.stale_partial.name}, left by an export that was interrupted")
    if target.replaces:
        notify(f"replacing the existing GGUF file {out}")
    while True:
        try:
            _write(partial, model.arch, gguf_arch, vocab, wanted, tensors, Path(folder).resolve().name, factor,
                   progress)
            os.replace(partial, out)
            break
        except OutOfRange as e:  # start over with that tensor in F32 (rare: found only while writing)
            partial.unlink(missing_ok=True)
            tensors = [dataclasses.replace(t, ggml_type="F32", fallback=f"values up to {e.largest:.4g} are beyond "
                                           f"{t.ggml_type}'s range") if t.name == e.name else t for t in tensors]
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    fsync_dir(out.parent)
    return ExportResult(path=out, architecture=gguf_arch.name, ggml_type=TYPES[wanted][0], tensors=len(tensors),
                        bytes=out.stat().st_size,
                        fallbacks=[(t.name, t.ggml_type, t.fallback) for t in tensors if t.fallback])


def _write(path: Path, arch, gguf_arch: str, vocab, wanted: str, tensors: list[Tensor], name: str, factor: float,
           progress) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter
    writer = GGUFWriter(path, gguf_arch.name)
    metadata(writer, arch, gguf_arch, vocab, wanted, name, factor)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.ggml_type),
                               raw_dtype=GGMLQuantizationType[t.ggml_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    f = writer.fout[0]
    try:
        for t in tensors:
            writer.write_padding(f, f.tell())
            written = 0
            for chunk in t.read():
                data = encode(chunk, t.ggml_type, t.name)
                data.tofile(f)
                written += data.nbytes
                fault_point("gguf_mid_write")
            if written != nbytes(t.shape, t.ggml_type):
                raise AssertionError(f"{t.name}: wrote {written} bytes, planned {nbytes(t.shape, t.ggml_type)}")
            if progress:
                progress(1)
        f.flush()
        os.fsync(f.fileno())
    finally:
        writer.close()
