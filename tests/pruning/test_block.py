"""The block forward equals transformers' decoder layer for every family, on the CPU and (where a
GPU is present) on CUDA."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamprune.arch.families import architecture, read_config, rotary_tables
from streamprune.pruning.block import block_forward
from streamprune.store.shards import ShardIndex
from tests.models import DEVICES, save_tiny_model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_streamed_blocks_equal_transformers(tmp_path, family, device):
    folder = save_tiny_model(tmp_path / family, family, layers=3)
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    spec = architecture(read_config(folder))
    index = ShardIndex.open(folder)
    ids = torch.randint(0, spec.vocab, (2, 40))  # 40 > mistral's sliding window of 16
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        emb = index.load({"e": "model.embed_tokens.weight"})["e"]
        x = emb[ids].to(device)
        cos, sin = rotary_tables(spec.config, ids.shape[1], device)
        for layer in range(spec.n_layers):
            x = block_forward(index.load(spec.block_tensors(layer), device), spec.blocks[layer], x, cos, sin)
            if layer < spec.n_layers - 1:
                assert (x.cpu() - expected.hidden_states[layer + 1]).abs().max() <= 1e-4
        final = ref.model.norm(x.cpu())
        assert (ref.lm_head(final) - expected.logits).abs().max() <= 1e-4
