"""vLLM model classes for streamprune outputs whose blocks have different shapes (config.json with
`per_layer_config`, named `StreamPrune<Family>ForCausalLM`; see docs/output-format.md). Imported by
vLLM only, through the plugin (vllm_plugin.py), in vLLM's own environment.

vLLM's own decoder layers read the head counts, KV heads and MLP width from the config object they are
handed, and vLLM sizes its KV cache from each layer's attention module. So each class is vLLM's own
backbone (embedding, layers, final norm, weight loading) with every decoder layer built from that
layer's config (`config.per_layer_config[i]`, head_dim written out), and vLLM's lm_head and logits.
Tensor parallelism splits each layer by its own counts (`--multiple-of N` outputs split N ways).

Qwen2 is built from vLLM's Llama layer with q/k/v biases (the same computation): vLLM's own Qwen2
attention takes head_dim as hidden_size / heads, which a block that lost heads no longer is."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralModel
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
from vllm.model_executor.models.utils import AutoWeightsLoader, extract_layer_index, maybe_prefix


def layer_builder(layer_cls: type[nn.Module], layer_configs, settings: dict):
    """What the backbone calls to build layer i (it names it by prefix, `model.layers.i`): `layer_cls`
    given layer i's own config, with `settings` set on a copy of it, instead of the model's."""
    def build(**kwargs) -> nn.Module:
        config = copy.copy(layer_configs[extract_layer_index(kwargs["prefix"])])
        for key, value in settings.items():
            setattr(config, key, value)
        return layer_cls(**dict(kwargs, config=config))
    return build


class PerBlockForCausalLM(nn.Module):
    """A decoder-only model whose layers differ in query heads, KV heads and MLP width."""

    backbone: type[nn.Module]  # vLLM's model body of the family
    layer: type[nn.Module]  # its decoder layer
    layer_argument: str  # the backbone's keyword for the layer class
    layer_settings: dict = {}  # set on each layer's config
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        build = layer_builder(self.layer, config.per_layer_config, self.layer_settings)
        self.model = self.backbone(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                   **{self.layer_argument: build})
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


class StreamPruneLlamaForCausalLM(PerBlockForCausalLM):
    backbone, layer, layer_argument = LlamaModel, LlamaDecoderLayer, "layer_type"


class StreamPruneMistralForCausalLM(PerBlockForCausalLM):
    backbone, layer, layer_argument = MistralModel, MistralDecoderLayer, "layer_type"


class StreamPruneQwen2ForCausalLM(PerBlockForCausalLM):
    backbone, layer, layer_argument = LlamaModel, LlamaDecoderLayer, "layer_type"
    layer_settings = {"qkv_bias": True}  # vLLM's Llama layer: q/k/v biases, none on o_proj


class StreamPruneQwen3ForCausalLM(PerBlockForCausalLM):
    # vLLM's Qwen3 body is Qwen2's with Qwen3's layer (q/k norms)
    backbone, layer, layer_argument = Qwen2Model, Qwen3DecoderLayer, "decoder_layer_type"
