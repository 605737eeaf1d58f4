"""The model's description as the rest of streamprune sees it: a decoder block's shapes (BlockSpec)
and the whole model's (Architecture), with the tensor names they map to. families.py builds them
from a config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Short names used by the math, mapped to the per-layer Hugging Face tensor names.
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class BlockSpec:
    """Shapes of one decoder block. Heads are numbered group-major: query head h uses KV head
    h // group (the layout transformers' repeat_kv assumes)."""

    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int
    eps: float
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv

    def tensor_names(self) -> list[str]:
        names = ["attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"]
        if self.qkv_bias:
            names += ["q_bias", "k_bias", "v_bias"]
        if self.o_bias:
            names += ["o_bias"]
        if self.qk_norm:
            names += ["q_norm", "k_norm"]
        if self.mlp_bias:
            names += ["gate_bias", "up_bias", "down_bias"]
        return names

    def shapes(self) -> dict[str, tuple[int, ...]]:
        H, KV, D, E, inter = self.n_heads, self.n_kv, self.head_dim, self.hidden, self.intermediate
        full = {
            "attn_norm": (E,), "mlp_norm": (E,),
            "q": (H * D, E), "k": (KV * D, E), "v": (KV * D, E), "o": (E, H * D),
            "q_bias": (H * D,), "k_bias": (KV * D,), "v_bias": (KV * D,), "o_bias": (E,),
            "q_norm": (D,), "k_norm": (D,),
            "gate": (inter, E), "up": (inter, E), "down": (E, inter),
            "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (E,),
        }
        return {n: full[n] for n in self.tensor_names()}

    def with_biases(self, sublayers) -> "BlockSpec":
        """This block with the biases a stock config adds for `sublayers` (see Family.bias_keys)."""
        return dataclasses.replace(self, qkv_bias=self.qkv_bias or "attention" in sublayers,
                                   o_bias=self.o_bias or "attention" in sublayers,
                                   mlp_bias=self.mlp_bias or "mlp" in sublayers)

    @property
    def neuron_params(self) -> int:
        """Weights of one MLP neuron: its gate and up rows and its down column."""
        return 3 * self.hidden

    def mlp_params(self, neurons: int | None = None) -> int:
        """Weights of the MLP with `neurons` neurons (default: all of this block's)."""
        return self.neuron_params * (self.intermediate if neurons is None else neurons)

    def n_params(self) -> int:
        total = 0
        for shape in self.shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


@dataclass(frozen=True)
class Architecture:
    model_type: str
    n_layers: int
    vocab: int
    hidden: int
    tied: bool
    blocks: tuple[BlockSpec, ...]
    config: dict  # config.json as read

    @property
    def uniform(self) -> bool:
        """Every block has the same shape (an input streamprune cut per block may not)."""
        return len(set(self.blocks)) == 1

    @property
    def widest(self) -> BlockSpec:
        """The block with the most weights (what memory is planned for)."""
        return max(self.blocks, key=lambda b: b.n_params())

    def layer_tensor(self, layer: int, short: str) -> str:
        return f"model.layers.{layer}.{BLOCK_TENSORS[short]}"

    def block_tensors(self, layer: int) -> dict[str, str]:
        return {s: self.layer_tensor(layer, s) for s in self.blocks[layer].tensor_names()}

    @property
    def head_tensor(self) -> str:
        """The tensor lm_head reads: its own, or the embedding when tied."""
        return EMBED if self.tied else LM_HEAD

    def other_tensors(self) -> list[str]:
        return [EMBED, FINAL_NORM] + ([] if self.tied else [LM_HEAD])

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {EMBED: (self.vocab, self.hidden), FINAL_NORM: (self.hidden,)}
        if not self.tied:
            shapes[LM_HEAD] = (self.vocab, self.hidden)
        for i, b in enumerate(self.blocks):
            for short, shape in b.shapes().items():
                shapes[self.layer_tensor(i, short)] = shape
        return shapes
