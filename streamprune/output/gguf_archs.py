"""What each llama.cpp architecture the export writes can hold, and the choice among them: the
family's own architecture where it holds the model's shapes and tensors, `deci` where only it does,
a one-line refusal where neither does. Checked against the prebuilt llama.cpp (xllamacpp) by
tests/output/test_gguf_archs.py: llama.cpp refuses a file whose tensors have other shapes than its
architecture builds, or that it does not load (`wrong number of tensors`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.spec import Architecture
from ..errors import StreamPruneError

QKV_BIASES = frozenset({"q_bias", "k_bias", "v_bias"})
ALL_BIASES = QKV_BIASES | {"o_bias", "gate_bias", "up_bias", "down_bias"}


@dataclass(frozen=True)
class LlamaCppArch:
    """One llama.cpp architecture, as its model loader builds the tensors (src/llama-model.cpp)."""

    name: str
    per_layer_shapes: bool  # head counts, KV heads and FFN width read per layer (arrays); else layer 0's for all
    heads_fill_hidden: bool  # attn_q is hidden x hidden: query heads x head_dim must equal hidden_size
    qk_norm: bool  # attn_q_norm/attn_k_norm: required when True, not loaded when False
    biases: frozenset[str]  # the bias tensors it loads
    required_biases: frozenset[str] = frozenset()
    paired_rope: bool = False  # rotary on adjacent pairs (q/k rows permuted from transformers' halves)
    rope_freqs: bool = False  # takes llama3's frequency factors (a rope_freqs tensor)


ARCHS = {a.name: a for a in (
    LlamaCppArch("llama", per_layer_shapes=False, heads_fill_hidden=False, qk_norm=False, biases=ALL_BIASES,
                 paired_rope=True, rope_freqs=True),
    LlamaCppArch("qwen2", per_layer_shapes=False, heads_fill_hidden=True, qk_norm=False, biases=QKV_BIASES,
                 required_biases=QKV_BIASES),
    LlamaCppArch("qwen3", per_layer_shapes=False, heads_fill_hidden=False, qk_norm=True, biases=QKV_BIASES),
    # NVIDIA's Nemotron-NAS: every layer its own heads, KV heads and FFN width (src/models/deci.cpp)
    LlamaCppArch("deci", per_layer_shapes=True, heads_fill_hidden=False, qk_norm=False, biases=ALL_BIASES,
                 paired_rope=True, rope_freqs=True),
)}
STOCK = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # model_type -> its own
PER_LAYER = "deci"
WORKS = ("exported: Llama, Mistral and Qwen2 of any shape (per-block shapes as llama.cpp's 'deci'), Qwen3 with one "
         "shape for every block (--allocation uniform) and no o_proj bias")


def cannot_hold(target: LlamaCppArch, arch: Architecture, rope_factors: bool = False) -> str | None:
    """Why llama.cpp's `target` cannot run this model exactly (a phrase), or None when it can."""
    blocks = arch.blocks
    if not target.per_layer_shapes and not arch.uniform:
        return "builds every layer with the first one's shape, and these blocks differ"
    for i, b in enumerate(blocks):
        if target.heads_fill_hidden and b.n_heads * b.head_dim != arch.hidden:
            return (f"needs query heads x head_dim = hidden_size {arch.hidden} (block {i}: {b.n_heads} x "
                    f"{b.head_dim})")
        if b.qk_norm != target.qk_norm:
            return "has no q/k norms" if b.qk_norm else "needs q/k norms"
        biases = {n for n in b.tensor_names() if n.endswith("_bias")}
        if biases - target.biases:
            return f"loads no {'/'.join(sorted(n.removesuffix('_bias') for n in biases - target.biases))} bias"
        if target.required_biases - biases:
            return f"needs {'/'.join(sorted(n.removesuffix('_bias') for n in target.required_biases - biases))} biases"
    if rope_factors and not target.rope_freqs:
        return "takes no rotary frequency factors (llama3 rope scaling)"
    return None


def choose(arch: Architecture, rope_factors: bool = False) -> LlamaCppArch:
    """The family's own llama.cpp architecture if it holds the model, else deci, else a refusal
    naming why each cannot (before anything is written)."""
    own = ARCHS[STOCK[arch.model_type]]
    why_own = cannot_hold(own, arch, rope_factors)
    if why_own is None:
        return own
    deci = ARCHS[PER_LAYER]
    why_deci = cannot_hold(deci, arch, rope_factors)
    if why_deci is None:
        return deci
    raise StreamPruneError(f"llama.cpp cannot run this {arch.model_type} model exactly: its {own.name} architecture "
                           f"{why_own}, and {deci.name} {why_deci}; {WORKS}")
