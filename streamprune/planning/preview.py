"""What `run --survey-only` prints: from the survey's measured costs, the shape the allocation
would give every block at each sparsity asked for, and the cost it predicts (the sum of the blocks'
costs: their relative output errors, as the allocation adds them). Pure functions of (blocks,
costs, sizes); nothing is pruned."""

from __future__ import annotations

from ..arch.spec import BlockSpec
from ..pruning.allocation import allocate, linear_params
from ..pruning.costs import BlockCosts
from ..pruning.selection import Sizes


def survey_previews(cfg, arch, costs: list[BlockCosts], sparsities) -> list[dict]:
    """preview() at each sparsity, by cfg's allocation and alignment; each sparsity checked as run checks it."""
    from ..checks.validate import check_sparsity
    from ..config import check_sparsity_range
    out = []
    for sparsity in sparsities:
        check_sparsity_range(sparsity)
        check_sparsity(arch, sparsity, cfg.alignment)
        sizes = allocate(cfg.allocation, arch.blocks, costs, sparsity, cfg.alignment)
        out.append(preview(arch.blocks, costs, sparsity, sizes))
    return out


def block_cost(c: BlockCosts, s: Sizes | None) -> float:
    """The measured cost of cutting a block to `s` (None: dropping it)."""
    return c.drop if s is None else c.heads.get((s.n_kv, s.group), 0.0) + c.mlp(s.intermediate)


def preview(blocks: tuple[BlockSpec, ...], costs: list[BlockCosts], sparsity: float,
            sizes: list[Sizes | None]) -> dict:
    full = [linear_params(b, Sizes(b.n_kv, b.group, b.intermediate)) for b in blocks]
    kept = [linear_params(b, s) for b, s in zip(blocks, sizes)]
    return {"sparsity": sparsity, "linear_params_before": sum(full), "linear_params_after": sum(kept),
            "removed_fraction": 1 - sum(kept) / sum(full),
            "predicted_cost": sum(block_cost(c, s) for c, s in zip(costs, sizes)),
            "blocks": [None if s is None else {"heads": s.n_heads, "kv_heads": s.n_kv, "neurons": s.intermediate,
                                               "cost": block_cost(c, s)} for c, s in zip(costs, sizes)]}


def render_previews(previews: list[dict], blocks: tuple[BlockSpec, ...]) -> list[str]:
    """One table: a row per block, a column per sparsity (heads/KV heads/neurons, or 'dropped'),
    then the linear weights removed and the predicted cost of each."""
    b0 = blocks[0]
    head = ["block", "input"] + [f"at {p['sparsity']:g}" for p in previews]
    rows = [head]
    for i, b in enumerate(blocks):
        cells = [str(i), f"{b.n_heads}/{b.n_kv}/{b.intermediate}"]
        for p in previews:
            s = p["blocks"][i]
            cells.append("dropped" if s is None else f"{s['heads']}/{s['kv_heads']}/{s['neurons']}")
        rows.append(cells)
    rows.append(["removed", ""] + [f"{100 * p['removed_fraction']:.1f}%" for p in previews])
    rows.append(["cost", ""] + [f"{p['predicted_cost']:.4f}" for p in previews])
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 2, "  ".join("-" * w for w in widths))
    return [f"shapes per block (query heads/KV heads/neurons; input {b0.n_heads}/{b0.n_kv}/{b0.intermediate}):",
            *lines,
            "cost: the sum of the blocks' measured costs (relative output errors) that the allocation minimises; "
            "compare it between sparsities, not models"]
