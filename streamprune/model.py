"""What is known before any weight is read: the input model (its config and where every tensor
lives), the device and compute dtype, and the shape every block is cut to with the output's
config.json. Used by the run, plan, inspect and eval alike; reads headers and config only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StreamPruneError
from .families import BlockSpec, ModelSpec, model_spec, pruned_config, read_config
from .selection import Sizes, uniform_sizes
from .shards import ShardIndex


@dataclass(frozen=True)
class Model:
    """Everything known about the input model before any weight is read."""

    folder: Path
    spec: ModelSpec
    index: ShardIndex


def open_model(folder: Path) -> Model:
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamPruneError(f"model folder not found: {folder}")
    spec = model_spec(read_config(folder))
    index = ShardIndex.open(folder)
    index.check(spec.expected_shapes())
    return Model(folder, spec, index)


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StreamPruneError("--device cuda requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)")
    return dev


def compute_dtype(dev: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU; the model's own dtype on a GPU."""
    return torch.float32 if dev.type == "cpu" else model_dtype


def cut_sublayers(block: BlockSpec, sizes: Sizes) -> frozenset[str]:
    """"attention" if heads are removed, "mlp" if neurons are."""
    return frozenset(s for s, cut in (("attention", sizes.n_heads < block.n_heads),
                                      ("mlp", sizes.intermediate < block.intermediate)) if cut)


def output_shape(model: Model, sparsity: float, needs_biases: bool = False) -> tuple[Sizes, dict]:
    """Uniform sizes for every block, and the output config.json (validated by transformers).
    `needs_biases` (mean compensation): each sublayer that loses units gets a bias slot where the
    output family has one."""
    block = model.spec.blocks[0]
    sizes = uniform_sizes(block, sparsity)
    biases = cut_sublayers(block, sizes) if needs_biases else ()
    return sizes, pruned_config(model.spec.config, sizes.n_heads, sizes.n_kv, sizes.intermediate, biases)
