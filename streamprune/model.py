"""What is known before any weight is read: the input model (its config and where every tensor
lives), the device and compute dtype, and the shape every block is cut to with the output's
config.json. Used by the run, plan, inspect and eval alike; reads headers and config only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StreamPruneError
from .families import BlockSpec, Architecture, architecture, read_config
from .output_config import heterogeneous_config
from .selection import Sizes, uniform_sizes
from .shards import ShardIndex


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


def parse_device(device: str) -> torch.device:
    """cpu, cuda or cuda:N, present here or not (plan describes a device it may not have)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)")
    return dev


def check_device(device: str) -> torch.device:
    """A device this machine has."""
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StreamPruneError("--device cuda requested but no CUDA GPU is available")
    return dev


def compute_dtype(dev: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU; the model's own dtype on a GPU."""
    return torch.float32 if dev.type == "cpu" else model_dtype


def block_generator(seed: int, layer: int) -> torch.Generator:
    """The random stream of one block (survey and pruning alike): a resumed run redraws the same."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def cut_sublayers(block: BlockSpec, sizes: Sizes | None) -> frozenset[str]:
    """"attention" if heads are removed, "mlp" if neurons are (both for a dropped block)."""
    if sizes is None:
        return frozenset(("attention", "mlp"))
    return frozenset(s for s, cut in (("attention", sizes.n_heads < block.n_heads),
                                      ("mlp", sizes.intermediate < block.intermediate)) if cut)


@dataclass(frozen=True)
class Shape:
    """The cut: each block's sizes (None: the block is dropped) and the output's config.json."""

    sizes: tuple[Sizes | None, ...]
    config: dict

    def out_layer(self, layer: int) -> int | None:
        """Block `layer`'s index in the output (dropped blocks close up), None if dropped."""
        if self.sizes[layer] is None:
            return None
        return sum(s is not None for s in self.sizes[:layer])

    @property
    def uniform(self) -> bool:
        kept = {s for s in self.sizes if s is not None}
        return len(kept) == 1

    def describe(self) -> dict:
        """For report.json: the sizes, one number when every kept block has the same."""
        kept = [s for s in self.sizes if s is not None]
        def each(f):
            values = [None if s is None else f(s) for s in self.sizes]
            return values[0] if self.uniform and None not in values else values
        return {"heads": each(lambda s: s.n_heads), "kv_heads": each(lambda s: s.n_kv),
                "neurons": each(lambda s: s.intermediate), "dropped_blocks": [i for i, s in enumerate(self.sizes)
                                                                            if s is None],
                "blocks_kept": len(kept)}


def shape_of(model: Model, sizes: list[Sizes | None], needs_biases: bool = False) -> Shape:
    """The Shape of a cut to `sizes`, with its output config.json (families.heterogeneous_config:
    a stock config when the kept blocks share one shape). `needs_biases` (mean compensation): each
    sublayer that loses units in some block gets bias slots where the output family has them."""
    blocks = model.arch.blocks
    biases = frozenset().union(*(cut_sublayers(b, s) for b, s in zip(blocks, sizes))) if needs_biases else ()
    per_layer = [None if s is None else {"n_heads": s.n_heads, "n_kv": s.n_kv, "intermediate": s.intermediate}
                 for s in sizes]
    return Shape(tuple(sizes), heterogeneous_config(model.arch.config, per_layer, biases))


def check_uniform(arch: Architecture, what: str) -> None:
    """One shape for all blocks needs blocks of one shape to start from."""
    if not arch.uniform:
        raise StreamPruneError(f"the input's blocks have different shapes (a per-block output?); {what} cuts "
                               "blocks of one shape: use --allocation global")


def output_shape(model: Model, sparsity: float, needs_biases: bool = False, multiple_of: int = 1) -> Shape:
    """The fixed rule: uniform sizes for every block (selection.uniform_sizes), in counts
    `multiple_of` GPUs can split."""
    check_uniform(model.arch, "the fixed rule")
    sizes = uniform_sizes(model.arch.blocks[0], sparsity, multiple_of)
    return shape_of(model, [sizes] * model.arch.n_layers, needs_biases)
