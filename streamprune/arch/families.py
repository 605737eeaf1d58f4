"""Per-family facts in one table: tensor names, which optional tensors exist, rotary class,
and which output configs stock transformers accepts. Nothing else in streamprune branches on
the model family."""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import StreamPruneError
from ..store.input_files import is_input_file, read_json
from .spec import Architecture, BlockSpec


@dataclass(frozen=True)
class Family:
    """What differs between the supported families; nothing else in streamprune branches on them."""

    module: str  # transformers.models.<module>
    prefix: str  # class-name prefix: <prefix>Config, <prefix>ForCausalLM, <prefix>DecoderLayer, ...
    qk_norm: bool = False  # an RMSNorm on each query and key head (Qwen3)
    qkv_bias: bool = False  # q/k/v biases in every config (Qwen2)
    sliding_window_everywhere: bool = False  # sliding_window bites in every layer (Mistral), else per layer_types
    # sublayer -> the config key that gives its output projection a bias: attention_bias adds q/k/v/o
    # biases, mlp_bias gate/up/down biases. Mean compensation (FLAP's) puts the removed units' mean
    # output in o/down (zeros in the others); Mistral and Qwen2 have no such key.
    bias_keys: tuple[tuple[str, str], ...] = ()
    # the family a pruned config is written as when this one's config class refuses a head count
    # (LlamaConfig wants hidden_size % num_attention_heads == 0; Mistral computes the same block)
    written_as: str | None = None
    # vLLM's own class of the family takes head_dim as hidden_size / heads (Qwen2), so a block that lost
    # heads needs streamprune's class there (per_block_architecture) even when every block has one shape
    vllm_head_dim_from_hidden: bool = False

    @property
    def per_block_architecture(self) -> str:
        """config.json's `architectures` entry for an output whose blocks differ in shape: a class that
        streamprune's vLLM plugin registers (output/vllm_plugin.py), which builds each layer from its own
        config. Stock loaders build models from model_type, so they still refuse such a folder loudly."""
        return f"StreamPrune{self.prefix}ForCausalLM"

    def output_architecture(self, config: dict) -> str:
        """config.json's `architectures` entry for a pruned config of this family: the stock class when
        every block has one shape that vLLM's own class builds, else per_block_architecture."""
        heads_fill_hidden = config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]
        stock = "per_layer_config" not in config and (heads_fill_hidden or not self.vllm_head_dim_from_hidden)
        return self.architecture_name if stock else self.per_block_architecture

    @property
    def architecture_name(self) -> str:
        """config.json's `architectures` entry for one shape in every block: the family's stock class."""
        return f"{self.prefix}ForCausalLM"


FAMILIES = {
    "llama": Family("llama", "Llama", bias_keys=(("attention", "attention_bias"), ("mlp", "mlp_bias")),
                    written_as="mistral"),
    "mistral": Family("mistral", "Mistral", sliding_window_everywhere=True),
    "qwen2": Family("qwen2", "Qwen2", qkv_bias=True, vllm_head_dim_from_hidden=True),
    "qwen3": Family("qwen3", "Qwen3", qk_norm=True, bias_keys=(("attention", "attention_bias"),)),
}

def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not is_input_file(path):
        raise StreamPruneError(f"no config.json in {folder}")
    config = read_json(path, f"{path} is not valid JSON")
    if not isinstance(config, dict):
        raise StreamPruneError(f"{path} is not a JSON object (it is {type(config).__name__})")
    return config


def family(config: dict) -> Family:
    """The Family of config.json's model_type."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise StreamPruneError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def hf_config(config: dict):
    """The transformers config object of this family, validated by transformers itself (a
    per_layer_config by streamprune first: check_per_layer_config)."""
    fam = family(config)
    check_per_layer_config(config)
    cls = getattr(importlib.import_module(f"transformers.models.{fam.module}"), f"{fam.prefix}Config")
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        with transformers_quiet():  # its warnings would come before our one-line error
            return cls(**kwargs)
    except Exception as e:  # transformers raises several validation error types
        raise StreamPruneError(f"config.json rejected by transformers: {str(e).splitlines()[-1].strip()}") from None


@contextlib.contextmanager
def transformers_quiet():
    """transformers' own logging off below ERROR for the duration (its config validation warns on
    stderr about what streamprune then refuses, or accepts, in its own words)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# Sizes config.json must state (transformers' defaults are some other model's), and ones it may.
# Checked before transformers sees them: Qwen2Config builds a per-layer list, so a huge
# num_hidden_layers hangs it.
REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
MAX_LAYERS = 4096  # the deepest released models have under 200
MAX_SIZE = 2**31 - 1


def check_sizes(config: dict) -> None:
    for key in REQUIRED_SIZES:
        if key not in config:
            raise StreamPruneError(f"config.json: {key} is missing")
    for key in REQUIRED_SIZES + OPTIONAL_SIZES:
        value = config.get(key)
        if value is None and key in OPTIONAL_SIZES:
            continue
        if type(value) is not int or value < 1:
            raise StreamPruneError(f"config.json: {key} must be a positive integer, got {value!r}")
        most = MAX_LAYERS if key == "num_hidden_layers" else MAX_SIZE
        if value > most:
            raise StreamPruneError(f"config.json: {key} {value} is too large (at most {most})")


def check_eps(cfg) -> None:
    eps = getattr(cfg, "rms_norm_eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise StreamPruneError(f"config.json: rms_norm_eps must be a finite number >= 0, got {eps!r}")


def rope_type(cfg) -> str:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def check_rotary(config: dict, head_dim: int) -> None:
    """The rotary embedding transformers would build: a rope_type it knows, parameters it can
    compute with, finite angles of width head_dim. Computed for two positions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kind = rope_type(hf_config(config))
    known = {"default", *ROPE_INIT_FUNCTIONS}
    if kind not in known:
        raise StreamPruneError(f"config.json: unknown rope_type {kind!r} (known: {', '.join(sorted(known))})")
    try:
        cos, sin = rotary_tables(config, 2)
    except Exception as e:  # transformers' rope functions fail with KeyError, TypeError, ValueError...
        raise StreamPruneError(f"config.json: rope parameters ({kind}) rejected: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}") from None
    if cos.shape[-1] != head_dim:
        raise StreamPruneError(f"config.json: the rotary embedding is {cos.shape[-1]} wide, head_dim is {head_dim} "
                               "(partial rotary embeddings are not supported)")
    if not (torch.isfinite(cos).all() and torch.isfinite(sin).all()):
        raise StreamPruneError(f"config.json: rope parameters ({kind}) give NaN or Inf rotary angles")


def check_unquantized(config: dict) -> None:
    """A quantization_config over float weights would be copied into an output transformers
    then loads as quantized; a really quantized model fails the dtype check less clearly."""
    quant = config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise StreamPruneError(f"config.json has a quantization_config ({method}); only unquantized models "
                               "(F32, F16, BF16 weights) can be pruned")


def architecture(config: dict) -> Architecture:
    """Shapes of every block, read per layer: a config with `per_layer_config` (the per-block
    output, see heterogeneous_config) gives each block its own head and neuron counts. The config
    is checked before transformers sees it and before any per-layer spec is built."""
    family(config)
    check_sizes(config)
    check_unquantized(config)
    cfg = hf_config(config)
    model_type = config["model_type"]
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
        raise StreamPruneError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu)")
    check_eps(cfg)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and len(layer_types) != cfg.num_hidden_layers:
        raise StreamPruneError(f"config.json: layer_types has {len(layer_types)} entries, num_hidden_layers is "
                               f"{cfg.num_hidden_layers}")
    blocks = [_block_spec(cfg, layer, FAMILIES[model_type], i) for i, layer in enumerate(layer_configs(cfg))]
    check_rotary(config, blocks[0].head_dim)
    return Architecture(
        model_type=model_type, n_layers=cfg.num_hidden_layers, vocab=cfg.vocab_size,
        hidden=cfg.hidden_size, tied=bool(cfg.tie_word_embeddings), blocks=tuple(blocks),
        config=config,
    )


def _block_spec(cfg, layer, fam: Family, i: int) -> BlockSpec:
    """One block's shapes from its layer config (the model config itself when all are alike)."""
    where = f"layer {i}: " if cfg.is_heterogeneous else ""
    H, KV = layer.num_attention_heads, layer.num_key_value_heads or layer.num_attention_heads
    if H % KV:
        raise StreamPruneError(f"{where}num_attention_heads {H} is not a multiple of num_key_value_heads {KV}")
    head_dim = getattr(layer, "head_dim", None) or cfg.hidden_size // H
    if head_dim < 1:
        raise StreamPruneError(f"config.json: {where}hidden_size {cfg.hidden_size} is smaller than "
                               f"num_attention_heads {H} and there is no head_dim")
    keys = dict(fam.bias_keys)  # a bias key the family's modeling code ignores adds no tensor
    attn_bias = "attention" in keys and bool(getattr(layer, keys["attention"], False))
    layer_types = getattr(cfg, "layer_types", None)
    sliding = fam.sliding_window_everywhere or (layer_types is not None and layer_types[i] == "sliding_attention")
    return BlockSpec(
        hidden=cfg.hidden_size, n_heads=H, n_kv=KV,
        head_dim=head_dim,
        intermediate=layer.intermediate_size, eps=cfg.rms_norm_eps,
        qk_norm=fam.qk_norm,
        qkv_bias=fam.qkv_bias or attn_bias,
        o_bias=attn_bias,
        mlp_bias="mlp" in keys and bool(getattr(layer, keys["mlp"], False)),
        sliding_window=cfg.sliding_window if sliding else None,
    )


def rotary_tables(config: dict, seq_len: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim), fp32, from the family's own rotary module, so every
    rope_type transformers knows (llama3, yarn, ...) is computed exactly as transformers does."""
    rotary = rotary_embedding(config).to(device)
    x = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = rotary(x, torch.arange(seq_len, device=device)[None])
    return cos[0].float(), sin[0].float()


def rotary_embedding(config: dict):
    """The family's own rotary module (transformers' <Prefix>RotaryEmbedding) for config.json. The
    rotary embedding is the same in every layer (a per-layer head_dim is refused), so it is built
    from the global config, whose sizes some rope types (yarn, dynamic) read."""
    fam = FAMILIES[config["model_type"]]
    mod = importlib.import_module(f"transformers.models.{fam.module}.modeling_{fam.module}")
    return getattr(mod, f"{fam.prefix}RotaryEmbedding")(hf_config(global_config(config)))


def global_config(config: dict) -> dict:
    """config.json without its per-layer overrides."""
    return {k: v for k, v in config.items() if k != "per_layer_config"}


def bias_sublayers(config: dict) -> frozenset[str]:
    """The sublayers whose output projection has a bias under this config."""
    return frozenset(s for s, key in FAMILIES[config["model_type"]].bias_keys if config.get(key))


# What a block of a per-block output may change, by config key (transformers' `per_layer_config`,
# see docs/output-format.md). Anything else per layer (head_dim, rope, sliding windows, skipped
# sublayers) changes a computation streamprune does not model, so such a config is refused.
PER_LAYER_SHAPE = {"n_heads": "num_attention_heads", "n_kv": "num_key_value_heads", "intermediate": "intermediate_size"}
PER_LAYER_KEYS = frozenset(PER_LAYER_SHAPE.values()) | {"attention_bias", "mlp_bias"}


def check_per_layer_config(config: dict) -> None:
    """A per_layer_config streamprune can build, refused in one line before transformers or any
    allocation sees it: an object keyed by distinct layer indices within num_hidden_layers, each
    entry an object of PER_LAYER_KEYS with positive integer sizes (at most MAX_SIZE) and boolean
    bias switches."""
    per_layer = config.get("per_layer_config")
    if per_layer is None:
        return
    where = "config.json: per_layer_config"
    if not isinstance(per_layer, dict):
        raise StreamPruneError(f"{where} must be an object keyed by layer index, got {type(per_layer).__name__}")
    layers = config.get("num_hidden_layers")
    seen: dict[int, str] = {}
    for key, entry in per_layer.items():
        if not (isinstance(key, str) and key.isdigit() and key.isascii()):
            raise StreamPruneError(f"{where}: key {key!r} is not a layer index")
        i = int(key)
        if type(layers) is int and i >= layers:
            raise StreamPruneError(f"{where}: layer {i} is out of range (num_hidden_layers is {layers})")
        if i in seen:
            raise StreamPruneError(f"{where}: layer {i} is given twice ({seen[i]!r} and {key!r})")
        seen[i] = key
        if not isinstance(entry, dict):
            raise StreamPruneError(f"{where}: layer {i} must be an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - PER_LAYER_KEYS - {"skip"})
        if unknown:
            raise StreamPruneError(f"{where}: layer {i} overrides {', '.join(unknown)}; streamprune supports "
                                   f"per-layer {', '.join(sorted(PER_LAYER_KEYS))} only")
        for name, value in entry.items():
            if name in PER_LAYER_SHAPE.values() and (type(value) is not int or not 1 <= value <= MAX_SIZE):
                raise StreamPruneError(f"{where}: layer {i} {name} must be a positive integer, got {value!r}")
            if name in ("attention_bias", "mlp_bias") and type(value) is not bool:
                raise StreamPruneError(f"{where}: layer {i} {name} must be true or false, got {value!r}")


def layer_configs(cfg) -> list:
    """The transformers config of every layer (the model config itself when the model is uniform),
    refusing per-layer overrides that are not shapes or bias switches, and skipped sublayers."""
    if not cfg.is_heterogeneous:
        return [cfg] * cfg.num_hidden_layers
    unknown = sorted(set(cfg.per_layer_attributes) - PER_LAYER_KEYS)
    if unknown:
        raise StreamPruneError(f"per_layer_config overrides {', '.join(unknown)}; streamprune supports "
                               f"per-layer {', '.join(sorted(PER_LAYER_KEYS))} only")
    layers = list(cfg.per_layer_config)
    for i, layer in enumerate(layers):
        if getattr(layer, "skip", None):
            raise StreamPruneError(f"per_layer_config skips {', '.join(layer.skip)} in layer {i}; "
                                   "streamprune supports whole blocks only (a dropped block is removed, not skipped)")
    return layers
