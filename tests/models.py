"""Tiny random models of each family, saved as real sharded safetensors, for tests and benchmarks;
and single random blocks with their calibration inputs, for the tests of the per-block math."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from streamprune.arch.spec import BlockSpec
from streamprune.pruning.costs import BlockCosts

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = Path(__file__).resolve().parents[1] / "demo"

# the CUDA variants of the comparison tests run where a GPU is present (CI has none: they skip)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="needs a CUDA GPU"))]

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def tiny_config(family: str, layers: int = 2, hidden: int = 64, heads: int = 8, kv: int = 2,
                intermediate: int = 96, vocab: int = 128, **extra):
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  head_dim=hidden // heads, max_position_embeddings=512, tie_word_embeddings=False)
    if family == "llama":
        kwargs["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
    if family == "mistral":
        kwargs["sliding_window"] = 16
    kwargs.update(extra)
    return CONFIGS[family](**kwargs)


def save_tiny_model(folder: Path, family: str, layers: int = 2, dtype=torch.float32, seed: int = 0,
                    shard_size: str = "40KB", tokenizer_from: Path | None = None, **extra) -> Path:
    """A random model of `family` written with save_pretrained (sharded); returns the folder. A Qwen2
    with a tokenizer gets an embedding row for the <|endoftext|> its tokenizer class adds (id 512
    with the demo's tokenizer)."""
    if tokenizer_from is not None and family == "qwen2" and extra.get("vocab", 128) == 512:
        extra["vocab"] = 520
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, **extra))
    with torch.no_grad():  # random norms and biases, so slicing mistakes in them show up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    if tokenizer_from is not None:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return Path(folder)


def confident_model(folder: Path, family: str, vocab: int = 512, **extra) -> Path:
    """A random model of 3 blocks with the demo's tokenizer whose predictions are confident (lm_head
    scaled up), so that a wrong weight, bias or rotary layout moves the log-probabilities far beyond
    the tolerance of a comparison."""
    save_tiny_model(folder, family, layers=3, tokenizer_from=TINYSTORIES / "stories260K", vocab=vocab, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


def random_block(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of one block of `spec` (a BlockSpec), matrices scaled by 1/sqrt(fan-in), norms 1."""
    g = torch.Generator().manual_seed(seed)
    W = {name: torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) == 2 else 1)
         for name, shape in spec.shapes().items()}
    W["attn_norm"] = W["mlp_norm"] = torch.ones(spec.hidden)
    return W


def block_calibration(spec, seed: int = 0, samples: int = 8, seq_len: int = 16):
    """Random calibration inputs for a block of `spec`, in micro-batches of 2, with rotary tables."""
    from streamprune.pruning.scoring import Calibration
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, seq_len, spec.hidden, generator=g)
    angles = torch.arange(seq_len)[:, None] * 0.1 * torch.arange(1, spec.head_dim + 1)[None]
    return Calibration(lambda: iter(x.split(2)), angles.cos(), angles.sin(), torch.Generator().manual_seed(seed),
                       samples)


def save_header_only_model(folder: Path, family: str = "llama", layers: int = 1, hidden: int = 8192, heads: int = 64,
                           kv: int = 8, intermediate: int = 28672, vocab: int = 128) -> Path:
    """A bf16 model of any size whose safetensors file is a real header over a sparse file of zeros:
    what the plan reads (headers, the embedding / norm / lm_head checks) at no disk or memory cost.
    Defaults: one Llama-3-70B-shaped block."""
    import json
    import struct
    config = tiny_config(family, layers, hidden, heads, kv, intermediate, vocab)
    config.dtype = "bfloat16"
    config.max_position_embeddings = 8192  # as Llama 3 70B: windows of 2048 are what run takes
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    header, offset = {}, 0
    for name, p in model.state_dict().items():
        n = 2 * p.numel()
        header[name] = {"dtype": "BF16", "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    config.save_pretrained(folder)
    return Path(folder)


# A small block and costs of its every cut, for the tests of the allocation (allocation.py) and of
# its constraints (--multiple-of, --row-multiple).
SPEC = BlockSpec(hidden=32, n_heads=8, n_kv=4, head_dim=4, intermediate=48, eps=1e-5)


def fake_costs(scale: float) -> BlockCosts:
    """A block whose every cut costs `scale` times the fraction removed."""
    heads = {(kv, g): scale * (1 - kv * g / 8) for kv in range(1, 5) for g in range(1, 3)}
    neurons = [(n, scale * (1 - n / 48)) for n in range(48, 0, -6)]
    return BlockCosts(heads, neurons, drop=scale * 3)
