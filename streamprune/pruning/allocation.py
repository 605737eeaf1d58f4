"""The shape of every block from measured costs (costs.py), under one parameter budget for all
blocks together: pure functions of (block shapes, costs, sparsity) -> sizes per block.

- `uniform`: one shape for every block (a stock config loads it anywhere): the GQA layout and
  neuron count whose summed cost over all blocks is least, at the budget.
- `global`: each block its own shape, or none at all (the block dropped): minimise the summed
  cost of all blocks under the total budget, by Lagrangian relaxation (each block picks what
  minimises cost + lam * params; lam is bisected to the budget), then the budget left over goes
  to the neurons whose cost falls fastest.

Costs add across blocks and across a block's attention and MLP: an approximation (errors compound
and compensation interacts), which the quality benchmark (docs/quality.md) checks end to end."""

from __future__ import annotations

import math

from ..arch.spec import BlockSpec
from ..errors import StreamPruneError
from .costs import BlockCosts
from .selection import Alignment, Sizes, aligned, attention_params, head_layouts, kept_params, most_neurons, neuron_step


def linear_params(block: BlockSpec, sizes: Sizes | None) -> int:
    """Weights of the block's linear layers at `sizes` (None: the block is dropped)."""
    if sizes is None:
        return 0
    return attention_params(block, sizes.n_kv, sizes.group) + block.mlp_params(sizes.intermediate)


def param_budget(blocks: tuple[BlockSpec, ...], sparsity: float) -> int:
    """The parameters the blocks keep at `sparsity`, over all blocks (attention and MLP weights)."""
    return kept_params(sum(linear_params(b, Sizes(b.n_kv, b.group, b.intermediate)) for b in blocks), sparsity)


def neurons_for(block: BlockSpec, params: int, kv: int, g: int, multiple_of: Alignment | int = 1) -> int:
    """The most neurons that fit in `params` beside the layout (kv, g), aligned, at least one step."""
    align = neuron_step(block, multiple_of)
    n = int((params - attention_params(block, kv, g)) // block.neuron_params // align) * align
    return min(most_neurons(block, multiple_of), n)


def allocate_uniform(blocks: tuple[BlockSpec, ...], costs: list[BlockCosts], sparsity: float,
                     multiple_of: Alignment | int = 1) -> list[Sizes]:
    """One shape for every block (they share one shape in a stock config); with `multiple_of` > 1,
    one that many GPUs can split (selection.tensor_parallel_ok)."""
    block = blocks[0]
    per_block = param_budget(blocks, sparsity) // len(blocks)
    best = None
    for kv, g in head_layouts(block, multiple_of):
        n = neurons_for(block, per_block, kv, g, multiple_of)
        if n < neuron_step(block, multiple_of):
            continue
        total = sum(c.heads[(kv, g)] + c.mlp(n) for c in costs)
        key = (total, -kv * g, -kv)  # ties: more heads
        if best is None or key < best[0]:
            best = (key, Sizes(kv, g, n))
    if best is None:
        raise StreamPruneError(f"no shape of one block fits --sparsity {sparsity:g}: use a lower sparsity or "
                               "--allocation global")
    return [best[1]] * len(blocks)


def neuron_options(block: BlockSpec, c: BlockCosts, multiple_of: Alignment | int) -> list[tuple[int, float]]:
    """The points (neurons kept, cost) a block may take: its measured curve, each point rounded
    down to a multiple of `multiple_of` (and costed there) when that is more than 1."""
    if aligned(multiple_of).free:
        return [(n, cost) for n, cost in c.neurons if n >= 1]
    step = neuron_step(block, multiple_of)
    counts = sorted({n // step * step for n, _ in c.neurons if n >= step}, reverse=True)
    return [(n, c.mlp(n)) for n in counts]


def block_choice(block: BlockSpec, c: BlockCosts, lam: float, neurons: list[tuple[int, float]],
                 layouts: set[tuple[int, int]]) -> tuple[float, Sizes | None]:
    """What block minimises cost + lam * params: a head layout among `layouts` and a point of its
    neuron curve among `neurons` (neuron_options: both fixed over the search for lam), or dropping it."""
    best = (c.drop, None)
    # (lam * 3 * hidden * n, left to right as written: the chosen shapes depend on its rounding)
    mlp = min(((cost + lam * 3 * block.hidden * n, n) for n, cost in neurons), key=lambda t: (t[0], -t[1]))
    for (kv, g), head_cost in c.heads.items():
        if (kv, g) not in layouts:
            continue
        value = head_cost + lam * attention_params(block, kv, g) + mlp[0]
        if value < best[0]:
            best = (value, Sizes(kv, g, mlp[1]))
    return best


def allocate_global(blocks: tuple[BlockSpec, ...], costs: list[BlockCosts], sparsity: float,
                    allow_drop: bool = True, multiple_of: Alignment | int = 1) -> list[Sizes | None]:
    """Per-block shapes (None: dropped) whose summed cost is least within the budget; with
    `multiple_of` > 1, shapes that many GPUs can split (selection.tensor_parallel_ok)."""
    target = param_budget(blocks, sparsity)
    if not allow_drop:
        costs = [BlockCosts(c.heads, c.neurons, float("inf")) for c in costs]

    options = [(neuron_options(b, c, multiple_of), set(head_layouts(b, multiple_of))) for b, c in zip(blocks, costs)]

    def choose(lam: float) -> list[Sizes | None]:
        return [block_choice(b, c, lam, *o)[1] for b, c, o in zip(blocks, costs, options)]

    def params(sizes) -> float:
        return sum(linear_params(b, s) for b, s in zip(blocks, sizes))

    lo, hi = 0.0, 1.0
    while params(choose(hi)) > target:
        if hi > 1e30:  # even the least each block may keep is over the budget
            raise StreamPruneError(f"no shapes fit --sparsity {sparsity:g}: the least every block can keep "
                                   f"({params(choose(hi)):,} parameters) is more than it keeps ({target:,})")
        hi *= 4
    for _ in range(100):  # the least lam within the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(choose(mid)) > target else (lo, mid)
    sizes = choose(hi)
    return fill(blocks, costs, sizes, target - params(sizes), multiple_of)


def fill(blocks, costs: list[BlockCosts], sizes: list[Sizes | None], slack: int,
         multiple_of: Alignment | int = 1) -> list[Sizes | None]:
    """Spend what is left of the budget on neurons, a step at a time where the cost falls most per
    parameter (dropped blocks stay dropped)."""
    sizes = list(sizes)
    while True:
        best = None
        for i, (b, c, s) in enumerate(zip(blocks, costs, sizes)):
            align, most = neuron_step(b, multiple_of), most_neurons(b, multiple_of)
            if s is None or s.intermediate >= most:
                continue
            step = min(align * max(1, b.intermediate // 256), most - s.intermediate)
            cost_params = b.mlp_params(step)
            if cost_params > slack:
                step = int(slack // b.neuron_params // align) * align
                cost_params = b.mlp_params(step)
            if step <= 0:
                continue
            gain = (c.mlp(s.intermediate) - c.mlp(s.intermediate + step)) / cost_params
            if best is None or gain > best[0]:
                best = (gain, i, step, cost_params)
        if best is None:
            return sizes
        _, i, step, cost_params = best
        sizes[i] = Sizes(sizes[i].n_kv, sizes[i].group, sizes[i].intermediate + step)
        slack -= cost_params


def check_finite_costs(costs: list[BlockCosts]) -> None:
    """Every measured cost is a number: a NaN compares false with everything and would drop its block."""
    for i, c in enumerate(costs):
        values = [*c.heads.values(), *(cost for _, cost in c.neurons), c.drop]
        if not all(math.isfinite(v) for v in values):
            raise StreamPruneError(f"the survey measured a cost of block {i} that is not a number "
                                   f"({next(v for v in values if not math.isfinite(v))}); its activations overflow "
                                   "in this dtype: run on the CPU or in float32, or --restart")


def allocate(allocation: str, blocks: tuple[BlockSpec, ...], costs: list[BlockCosts], sparsity: float,
             alignment: Alignment | int = 1) -> list[Sizes | None]:
    """Every block's sizes by `allocation` ("global" or "uniform") at `sparsity`."""
    check_finite_costs(costs)
    allocator = allocate_global if allocation == "global" else allocate_uniform
    return allocator(blocks, costs, sparsity, multiple_of=alignment)
