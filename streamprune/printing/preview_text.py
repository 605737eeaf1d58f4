"""The survey's previews (`run --survey-only`) as one table."""

from __future__ import annotations

from ..pruning.preview import BlockShape, Preview


def render_previews(previews: tuple[Preview, ...], blocks: tuple[BlockShape, ...]) -> list[str]:
    """One table: a row per block, a column per sparsity (heads/KV heads/neurons, or 'dropped'),
    then the linear weights removed and the predicted cost of each."""
    head = ["block", "input"] + [f"at {p.sparsity:g}" for p in previews]
    rows = [head]
    for i, b in enumerate(blocks):
        cells = [str(i), shape_text(b)]
        for p in previews:
            s = p.blocks[i]
            cells.append("dropped" if s is None else shape_text(s))
        rows.append(cells)
    rows.append(["removed", ""] + [f"{100 * p.removed_fraction:.1f}%" for p in previews])
    rows.append(["cost", ""] + [f"{p.predicted_cost:.4f}" for p in previews])
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 2, "  ".join("-" * w for w in widths))
    return [f"shapes per block (query heads/KV heads/neurons; input {shape_text(blocks[0])}):",
            *lines,
            "cost: the sum of the blocks' measured costs (relative output errors) that the allocation minimises; "
            "compare it between sparsities, not models"]


def shape_text(s: BlockShape) -> str:
    return f"{s.heads}/{s.kv_heads}/{s.neurons}"
