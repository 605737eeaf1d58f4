"""How many units each block keeps (a pure function of shapes and sparsity) and which ones
(a pure function of scores). GQA: every kept KV group keeps the same number of query heads, so
the pruned block is a valid GQA layout that stock configs can describe."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..arch.spec import BlockSpec


@dataclass(frozen=True)
class Sizes:
    n_kv: int
    group: int  # query heads per kept KV group
    intermediate: int

    @property
    def n_heads(self) -> int:
        return self.n_kv * self.group


@dataclass(frozen=True)
class Kept:
    heads: torch.Tensor  # kept query heads, ascending, group-major
    kv: torch.Tensor  # kept KV groups, ascending
    neurons: torch.Tensor  # kept MLP neurons, ascending


@dataclass(frozen=True)
class Alignment:
    """What kept counts are multiples of. `gpus` (--multiple-of N): N GPUs can split every block
    (tensor_parallel_ok). `rows` (--row-multiple M): every row length a cut sets, the neurons
    (down_proj's rows) and the query heads x head_dim (o_proj's rows), splits into the blocks of a
    quantized type (32 for q8_0 and q4_0, 256 for llama.cpp's k-quants)."""

    gpus: int = 1
    rows: int = 1

    @property
    def free(self) -> bool:
        return self.gpus == 1 and self.rows == 1

    @property
    def neurons(self) -> int:
        """What every kept neuron count is a multiple of."""
        return math.lcm(self.gpus, self.rows)

    def layout_ok(self, spec: BlockSpec, n_kv: int, group: int) -> bool:
        return tensor_parallel_ok(n_kv, group, self.gpus) and n_kv * group * spec.head_dim % self.rows == 0

    def given(self) -> list[tuple[str, int]]:
        """The options that asked for it, with their values: [("--multiple-of", 8), ...]."""
        return [(option, n) for option, n in (("--multiple-of", self.gpus), ("--row-multiple", self.rows)) if n > 1]

    def options(self) -> str:
        """The options that asked for it, as typed."""
        return " ".join(f"{option} {n}" for option, n in self.given())


def aligned(multiple_of: "int | Alignment") -> Alignment:
    """An Alignment from --multiple-of alone (an int), or as it is."""
    return multiple_of if isinstance(multiple_of, Alignment) else Alignment(gpus=int(multiple_of))


def attention_params(spec: BlockSpec, n_kv: int, group: int) -> int:
    # q and o hold n_kv * group heads, k and v hold n_kv heads (biases and norms ignored)
    return 2 * spec.head_dim * spec.hidden * (n_kv * group + n_kv)


def tensor_parallel_ok(n_kv: int, group: int, multiple_of: int) -> bool:
    """Whether `multiple_of` GPUs (or any divisor of it) can split a layout of n_kv KV groups of
    `group` query heads each, as vLLM's tensor parallelism does: the query heads divide evenly,
    and the KV heads divide evenly or, when fewer than the GPUs, are replicated (which needs
    their count to divide the GPU count)."""
    return n_kv * group % multiple_of == 0 and (n_kv % multiple_of == 0 or multiple_of % n_kv == 0)


def head_layouts(spec: BlockSpec, multiple_of: int | Alignment = 1) -> list[tuple[int, int]]:
    """Every GQA layout (KV groups kept, query heads per group) a block may be cut to."""
    align = aligned(multiple_of)
    return [(kv, g) for kv in range(1, spec.n_kv + 1) for g in range(1, spec.group + 1)
            if align.layout_ok(spec, kv, g)]


def neuron_step(spec: BlockSpec, multiple_of: int | Alignment = 1) -> int:
    """What kept neuron counts are rounded to: 64 for wide MLPs, 1 for small ones, and a multiple
    of what the alignment asks."""
    return math.lcm(64 if spec.intermediate >= 4096 else 1, aligned(multiple_of).neurons)


def most_neurons(spec: BlockSpec, multiple_of: int | Alignment = 1) -> int:
    """The most neurons a block may keep: all of them, or the largest aligned count."""
    return spec.intermediate - spec.intermediate % aligned(multiple_of).neurons


def attention_kept(spec: BlockSpec, n_kv: int, group: int) -> float:
    """The fraction of the attention weights a layout keeps."""
    return attention_params(spec, n_kv, group) / attention_params(spec, spec.n_kv, spec.group)


def ranked_layouts(spec: BlockSpec, sparsity: float, multiple_of: int | Alignment = 1) -> list[tuple[int, int]]:
    """The fixed rule's order of GQA layouts: the kept fraction of the attention weights closest
    to 1 - sparsity first, ties to more query heads, then more KV groups."""
    return sorted(head_layouts(spec, multiple_of), key=lambda o: (
        abs(attention_kept(spec, *o) - (1 - sparsity)), -o[0] * o[1], -o[0]))


def uniform_sizes(spec: BlockSpec, sparsity: float, multiple_of: int | Alignment = 1) -> Sizes:
    """Remove about `sparsity` of the block's weights. Attention takes the GQA layout whose kept
    fraction is closest to 1 - sparsity (ties: more query heads); the MLP width absorbs the
    rest: the most neurons within the budget, in multiples of neuron_step (64 for wide MLPs, 1 for
    small ones). With `multiple_of` > 1, only layouts and neuron counts that
    many GPUs can split (tensor_parallel_ok) are taken, at sparsity 0 too."""
    if sparsity == 0 and aligned(multiple_of).free:
        return Sizes(spec.n_kv, spec.group, spec.intermediate)
    target = kept_params(attention_params(spec, spec.n_kv, spec.group) + spec.mlp_params(), sparsity)
    n_kv, group = ranked_layouts(spec, sparsity, multiple_of)[0]
    align = neuron_step(spec, multiple_of)
    inter = (target - attention_params(spec, n_kv, group)) // spec.neuron_params // align * align
    return Sizes(n_kv, group, max(align, min(most_neurons(spec, multiple_of), inter)))


def kept_params(total: int, sparsity: float) -> int:
    """The parameters of `total` that `sparsity` keeps, a whole number: (1 - sparsity) * total
    rounded to the nearest (0.45 * 774144 is 774143.99... in floating point: one parameter, not a
    neuron, is what that rounding may cost)."""
    return round((1 - sparsity) * total)


def select_units(head_scores: torch.Tensor, neuron_scores: torch.Tensor, spec: BlockSpec, sizes: Sizes) -> Kept:
    """Keep, in each KV group, its `sizes.group` best query heads; keep the `sizes.n_kv` groups
    whose kept heads score highest; keep the `sizes.intermediate` best neurons.
    Ties break towards lower indices, so the choice is deterministic."""
    per_group = head_scores.double().view(spec.n_kv, spec.group)
    order = torch.sort(per_group, dim=1, descending=True, stable=True).indices[:, :sizes.group]
    value = per_group.gather(1, order).sum(1)
    kv = torch.sort(torch.sort(value, descending=True, stable=True).indices[:sizes.n_kv]).values
    heads = torch.sort((kv[:, None] * spec.group + order[kv]).flatten()).values
    neurons = torch.sort(torch.sort(neuron_scores.double(), descending=True, stable=True)
                         .indices[:sizes.intermediate]).values
    return Kept(heads=heads, kv=kv, neurons=neurons)


def masks(spec: BlockSpec, kept: Kept) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 masks over query heads and neurons equivalent to keeping `kept`."""
    head_mask = torch.zeros(spec.n_heads)
    head_mask[kept.heads] = 1
    neuron_mask = torch.zeros(spec.intermediate)
    neuron_mask[kept.neurons] = 1
    return head_mask, neuron_mask
