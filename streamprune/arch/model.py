"""What is known before any weight is read: the input model (its config and where every tensor
lives), the device and the compute dtype. Used by the run, plan, inspect and eval alike; reads
headers and config only. The shape the blocks are cut to is pruning/shape.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import compute_dtype
from ..errors import StreamPruneError
from ..store.safetensors_header import DTYPES
from ..store.shards import ShardIndex
from .families import architecture, read_config
from .spec import Architecture


@dataclass(frozen=True)
class Model:
    """Everything known about the input model before any weight is read."""

    folder: Path
    arch: Architecture  # config.json read: shapes of every block (each a BlockSpec), vocabulary, tying
    index: ShardIndex


def open_model(folder: Path) -> Model:
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamPruneError(f"model folder not found: {folder}")
    arch = architecture(read_config(folder))
    index = ShardIndex.open(folder)
    index.check(arch.expected_shapes())
    index.check_finite(arch.other_tensors())  # copied byte for byte into the output: check them here
    return Model(folder, arch, index)


def model_from_headers(folder: Path, tensors: dict) -> Model:
    """A model known from its config.json (in `folder`) and shard headers read elsewhere (a Hub
    model not downloaded: hub.remote_model): enough for inspect and plan. Its shards are not in
    `folder`, so no weight can be read, and none is checked for NaN/Inf (run does that)."""
    folder = Path(folder)
    arch = architecture(read_config(folder))
    index = ShardIndex(folder, tensors)
    index.check(arch.expected_shapes())
    return Model(folder, arch, index)


def model_compute_dtype(model: "Model", dev: torch.device) -> torch.dtype:
    """The dtype the model's blocks compute in on `dev` (compute_dtype of its first block's q_proj)."""
    return compute_dtype(dev, DTYPES[model.index.tensors[model.arch.block_tensors(0)["q"]].dtype])


def block_generator(seed: int, layer: int) -> torch.Generator:
    """The random stream of one block (survey and pruning alike): a resumed run redraws the same."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)
