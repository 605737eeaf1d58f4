"""The cut's shape: each block's sizes (None: dropped) and the output's config.json; the fixed
rule's shape. Pure: from the model's description, no file is read."""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.model import Model
from ..arch.output_config import heterogeneous_config
from ..arch.spec import Architecture, BlockSpec
from ..errors import StreamPruneError
from .numerics import Ridges
from .selection import Alignment, Sizes, uniform_sizes


def cut_sublayers(block: BlockSpec, sizes: Sizes | None) -> frozenset[str]:
    """"attention" if heads are removed, "mlp" if neurons are (both for a dropped block)."""
    if sizes is None:
        return frozenset(("attention", "mlp"))
    return frozenset(s for s, cut in (("attention", sizes.n_heads < block.n_heads),
                                      ("mlp", sizes.intermediate < block.intermediate)) if cut)


@dataclass(frozen=True)
class Shape:
    """The cut: each block's sizes (None: the block is dropped) and the output's config.json; the
    ridges of each block's refits where the survey measured them (else numerics.RIDGE)."""

    sizes: tuple[Sizes | None, ...]
    config: dict
    ridges: tuple[Ridges | None, ...] = ()

    def ridges_of(self, layer: int) -> Ridges:
        ridges = self.ridges[layer] if layer < len(self.ridges) else None
        return ridges if ridges is not None else Ridges()

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


def shape_of(model: Model, sizes: list[Sizes | None], needs_biases: bool = False,
             ridges: tuple[Ridges | None, ...] = ()) -> Shape:
    """The Shape of a cut to `sizes`, with its output config.json (families.heterogeneous_config:
    a stock config when the kept blocks share one shape). `needs_biases` (mean compensation): each
    sublayer that loses units in some block gets bias slots where the output family has them."""
    blocks = model.arch.blocks
    biases = frozenset().union(*(cut_sublayers(b, s) for b, s in zip(blocks, sizes))) if needs_biases else ()
    per_layer = [None if s is None else {"n_heads": s.n_heads, "n_kv": s.n_kv, "intermediate": s.intermediate}
                 for s in sizes]
    return Shape(tuple(sizes), heterogeneous_config(model.arch.config, per_layer, biases), tuple(ridges))


def check_uniform(arch: Architecture, what: str) -> None:
    """One shape for all blocks needs blocks of one shape to start from."""
    if not arch.uniform:
        raise StreamPruneError(f"the input's blocks have different shapes (a per-block output?); {what} cuts "
                               "blocks of one shape: use --allocation global")


def rule_shape(model: Model, sparsity: float, needs_biases: bool = False, multiple_of: int | Alignment = 1) -> Shape:
    """The fixed rule: uniform sizes for every block (selection.uniform_sizes), in counts
    `multiple_of` GPUs can split."""
    check_uniform(model.arch, "the fixed rule")
    sizes = uniform_sizes(model.arch.blocks[0], sparsity, multiple_of)
    return shape_of(model, [sizes] * model.arch.n_layers, needs_biases)
