"""Load a streamprune output as a transformers model built from the family's stock classes.

A uniform output is a stock config: transformers' own from_pretrained loads it. An output cut per
block (config.json with `per_layer_config`, see docs/output-format.md) is not yet built by stock
transformers 5.x, which reads the per-layer config but refuses to construct a model from it. Here
the model is built with the input's shape on the meta device, every decoder layer is replaced by
the family's own DecoderLayer constructed from that layer's config, and the weights are loaded
strictly. The result is a plain LlamaForCausalLM (or Mistral, Qwen2, Qwen3): forward, generate
(DynamicCache sizes each layer from its own keys) and save_pretrained work unchanged. Nothing from
the model folder is executed (no remote code; auto_map is ignored)."""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path

import torch

from ..arch.families import FAMILIES, architecture, hf_config, read_config
from ..errors import StreamPruneError
from ..store.shards import ShardIndex

# the logger transformers warns on when a per-layer attribute is read from the global config
HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"


def load_pretrained(path, dtype: torch.dtype | None = None, device=None):
    """The model in folder `path`, in `dtype` (default: as stored) on `device` (default: cpu),
    in eval mode. Refuses a folder whose tensors are not exactly what its config.json describes."""
    folder = Path(path)
    if not folder.is_dir():
        raise StreamPruneError(f"model folder not found: {folder}")
    config = read_config(folder)
    cfg = hf_config(config)
    if not cfg.is_heterogeneous:
        return _load_uniform(folder, config, dtype, device)
    return _load_per_layer(folder, config, cfg, dtype, torch.device(device or "cpu"))


def family_classes(model_type: str) -> tuple[type, type]:
    """(ForCausalLM, DecoderLayer) of the family, looked up in transformers itself."""
    fam = FAMILIES[model_type]
    mod = importlib.import_module(f"transformers.models.{fam.module}.modeling_{fam.module}")
    return getattr(mod, f"{fam.prefix}ForCausalLM"), getattr(mod, f"{fam.prefix}DecoderLayer")


def _load_uniform(folder: Path, config: dict, dtype, device):
    """A stock config: the family class's own from_pretrained (a concrete class never consults
    auto_map), with missing, unexpected or mismatched weights turned into a refusal."""
    cls, _ = family_classes(config["model_type"])
    model, info = cls.from_pretrained(folder, dtype=dtype or "auto", device_map=device, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k.endswith("_keys") and v}
    if problems:
        raise StreamPruneError(f"{folder}: weights do not match config.json: {_describe(problems)}")
    return model


def _load_per_layer(folder: Path, config: dict, cfg, dtype, device: torch.device):
    spec = architecture(config)  # per-layer shapes; refuses per-layer keys the model cannot be built from
    index = ShardIndex.open(folder)
    expected = spec.expected_shapes()
    index.check(expected)
    unexpected = sorted(set(index.tensors) - set(expected))
    if unexpected:
        raise StreamPruneError(f"{folder}: weights do not match config.json: "
                               f"{_describe({'unexpected_keys': unexpected})}")
    model = build_per_layer(cfg, device)
    state = index.load({name: name for name in expected}, device=device, dtype=dtype)
    _assign(model, state)
    _load_generation_config(model, folder)
    return model.eval()


def build_per_layer(cfg, device: torch.device):
    """The family's ForCausalLM for heterogeneous `cfg`, parameters on the meta device: built with
    the global (input) shape, then every decoder layer rebuilt from its own layer config. The
    rotary tables are real (computed on CPU, as transformers does, then moved)."""
    cls, layer_cls = family_classes(cfg.model_type)
    with _global_shape_access(cfg):
        with torch.device("meta"):
            model = cls(cfg)
        rotary = type(model.model.rotary_emb)(config=cfg)
    model.model.rotary_emb = rotary.to(device)
    for i, layer_cfg in enumerate(cfg.per_layer_config):
        with torch.device("meta"):
            layer = layer_cls(layer_cfg, i)
        # the attention reads only _attn_implementation from its config at run time; the model's
        # own config keeps it in step with model.set_attn_implementation
        layer.self_attn.config = cfg
        model.model.layers[i] = layer
    return model


@contextlib.contextmanager
def _global_shape_access(cfg):
    """Let the stock constructors read the global (input) shape of a heterogeneous config, without
    transformers' warning: every layer they build that way is replaced. Off again afterwards, so
    code that reads a per-layer shape from the model config fails loudly instead of silently."""
    log = logging.getLogger(HETEROGENEITY_LOGGER)
    level = log.level
    cfg.allow_global_per_layer_attribute_access = True
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cfg.__dict__.pop("allow_global_per_layer_attribute_access", None)  # never serialized
        log.setLevel(level)


def _assign(model, state: dict[str, torch.Tensor]) -> None:
    """Put the loaded tensors in place of the meta parameters; tied lm_head follows the embedding."""
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    problems = {k: v for k, v in (("missing_keys", sorted(set(result.missing_keys) - tied)),
                                  ("unexpected_keys", sorted(result.unexpected_keys))) if v}
    if problems:
        raise StreamPruneError(f"weights do not match the model built from config.json: {_describe(problems)}")
    if tied:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise StreamPruneError(f"no weights for {_describe({'missing_keys': left})}")
    model.config.dtype = next(model.parameters()).dtype


def _load_generation_config(model, folder: Path) -> None:
    """generate()'s defaults (eos, pad, sampling) from the folder, as from_pretrained does."""
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(folder)


def _describe(problems: dict[str, list[str]]) -> str:
    return "; ".join(f"{k.replace('_', ' ')} {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                     for k, v in problems.items())
