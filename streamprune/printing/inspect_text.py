"""TODO docstring."""

from __future__ import annotations

from ..planning.inspect import MEASURED


def render_description(info: dict) -> str:
    """The terminal text of `streamprune inspect`."""
    lines = [f"{info['model_type']}: {info['layers']} layers, hidden {info['hidden']}, "
             f"{info['heads']} heads / {info['kv_heads']} KV heads (head_dim {info['head_dim']}), "
             f"{info['neurons']} neurons, vocab {info['vocab']}, dtype {info['dtype']}",
             f"params: {info['params']:,} total, {info['block_params']:,} in blocks"]
    pl = info["plan"]
    if pl is None:
        lines.append("blocks of different shapes (a per-block output): prune it with --allocation global")
        return "\n".join(lines)
    lines.append(f"fixed rule (--allocation rule) at sparsity {pl['sparsity']}: "
                 f"heads {info['heads']} -> {pl['heads']}, "
                 f"KV heads {info['kv_heads']} -> {pl['kv_heads']}, neurons {info['neurons']} -> {pl['neurons']} per "
                 f"block; block params {info['block_params']:,} -> {pl['block_params']:,} "
                 f"({100 * pl['removed_fraction']:.1f}% removed); output model_type {pl['output_model_type']}")
    lines.append(f"why {pl['heads']} of {info['heads']} query heads: the rule keeps the GQA layout (KV groups x query "
                 f"heads per group) whose share of the attention weights is closest to 1 - sparsity = "
                 f"{percent(1 - pl['sparsity'])} (ties: more query heads):")
    lines += [f"  {layout_text(o)}" + ("   <- kept" if i == 0 else "") for i, o in enumerate(pl["layouts"])]
    lines.append(f"  then the MLP keeps {pl['neurons']} of {info['neurons']} neurons, so that each block loses "
                 f"{percent(pl['removed_fraction'])} of its weights")
    if info["multiple_of"] > 1:
        lines.append(f"  (--multiple-of {info['multiple_of']}: only layouts with a multiple of {info['multiple_of']} "
                     f"query heads and a multiple or divisor of {info['multiple_of']} KV heads, and neuron counts "
                     f"that are multiples of {info['multiple_of']})")
    if info.get("row_multiple", 1) > 1:
        lines.append(f"  (--row-multiple {info['row_multiple']}: neuron counts and query heads x head_dim "
                     f"{info['head_dim']} are multiples of {info['row_multiple']}, "
                     "so a quantized type splits every row)")
    if info.get("row_multiple_note"):
        lines.append(f"  (--row-multiple 1, not the default: {info['row_multiple_note']})")
    if pl["output_model_type_reason"]:
        lines.append(f"why {pl['output_model_type']}: {pl['output_model_type_reason']}")
    lines.append(f"{MEASURED}.")
    family = info["output_family"]
    if family["written_as"]:
        lines.append(f"The output stays a {info['model_type']} only when every kept block has the same number of "
                     f"query heads and it divides hidden_size {info['hidden']} "
                     f"({either(family['head_counts'])}); otherwise it is written "
                     f"as a {family['written_as']}.")
    return "\n".join(lines)


def either(counts: list[int]) -> str:
    words = [str(n) for n in counts]
    return "none possible" if not words else words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def layout_text(o: dict) -> str:
    groups = "KV group" if o["kv_heads"] == 1 else "KV groups"
    return (f"{o['kv_heads']} {groups} x {o['heads_per_group']} = {o['heads']} heads keep "
            f"{percent(o['attention_kept'])}")


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"
