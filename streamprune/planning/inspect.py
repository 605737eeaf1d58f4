"""What a model is and what a sparsity would do to it, from config.json and headers only, and
why: which GQA layout the fixed rule keeps, and why the output changes family when it does."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..arch.families import FAMILIES
from ..arch.model import Model, open_model
from ..arch.output_config import family_change
from ..arch.spec import BlockSpec
from ..checks.validate import check_sparsity, row_multiple_unmet
from ..config import check_multiple_of_range, check_sparsity_range
from ..pruning.selection import Alignment, attention_kept, head_layouts, ranked_layouts
from ..pruning.shape import rule_shape

RULE = ("attention keeps the GQA layout (KV groups x query heads per group) whose share of the attention weights "
        "is closest to 1 - sparsity (ties: more query heads); the MLP keeps as many neurons as make the block as a "
        "whole lose the sparsity")
MEASURED = ("--allocation global (the default) and uniform choose the shapes from costs measured on the calibration "
            "text (the survey): `streamprune run ... --survey-only` measures them and shows every block's shape at "
            "several sparsities without pruning (runs with --survey-from prune from it at any sparsity)")


def describe(folder: Path | Model, sparsity: float, multiple_of: int = 1, row_multiple: int = 1,
             adaptable: tuple[str, ...] = ()) -> dict:
    """The model's shape and what the fixed rule (--allocation rule) would cut at `sparsity`, with
    the reasons; the measured allocations (uniform, global) decide only after the survey of a
    run. An input cut per block lists each block's shape, and has no fixed-rule plan. Refuses a
    sparsity that `run` would refuse, with the same check. `folder` may be a Model already opened
    (hub.remote_model). `adaptable` ("row_multiple"): left at its default, fitted as run fits it."""
    check_sparsity_range(sparsity)
    check_multiple_of_range(multiple_of)
    check_multiple_of_range(row_multiple, "--row-multiple")
    model = folder if isinstance(folder, Model) else open_model(folder)
    arch = model.arch
    rows_note = None
    if "row_multiple" in adaptable and row_multiple > 1:
        rows_note = row_multiple_unmet(arch, sparsity, multiple_of, row_multiple)
        row_multiple = 1 if rows_note else row_multiple
    given, multiple_of = multiple_of, Alignment(gpus=multiple_of, rows=row_multiple)
    check_sparsity(arch, sparsity, multiple_of)
    b = arch.blocks[0]
    block_params = sum(x.n_params() for x in arch.blocks)
    dtypes = sorted({model.index.tensors[n].dtype for n in arch.expected_shapes()})
    params = sum(math.prod(info.shape) for info in model.index.tensors.values())
    per_block = lambda f: f(b) if arch.uniform else [f(x) for x in arch.blocks]  # noqa: E731
    info = {
        "model_type": arch.model_type, "layers": arch.n_layers, "hidden": arch.hidden,
        "heads": per_block(lambda x: x.n_heads), "kv_heads": per_block(lambda x: x.n_kv), "head_dim": b.head_dim,
        "neurons": per_block(lambda x: x.intermediate), "vocab": arch.vocab, "dtype": "/".join(dtypes),
        "params": params, "block_params": block_params, "multiple_of": given, "row_multiple": row_multiple,
        "row_multiple_note": rows_note,
        "plan": None,
        "measured_allocations": MEASURED,
        "output_family": output_family(arch.model_type, b, multiple_of) if arch.uniform else None,
    }
    if arch.uniform:
        shape = rule_shape(model, sparsity, multiple_of=multiple_of)
        sizes = shape.sizes[0]
        new_block = dataclasses.replace(b, n_heads=sizes.n_heads, n_kv=sizes.n_kv, intermediate=sizes.intermediate)
        after = new_block.n_params() * arch.n_layers
        info["plan"] = {"allocation": "rule", "sparsity": sparsity, "heads": sizes.n_heads, "kv_heads": sizes.n_kv,
                        "neurons": sizes.intermediate, "block_params": after,
                        "removed_fraction": 1 - after / block_params,
                        "output_model_type": shape.config["model_type"],
                        "rule": RULE,
                        "layouts": [layout(b, kv, g) for kv, g in ranked_layouts(b, sparsity, multiple_of)[:3]],
                        "output_model_type_reason": family_change(arch.config, shape.config)}
    return info


def layout(spec: BlockSpec, n_kv: int, group: int) -> dict:
    return {"kv_heads": n_kv, "heads_per_group": group, "heads": n_kv * group,
            "attention_kept": attention_kept(spec, n_kv, group)}


def output_family(model_type: str, spec: BlockSpec, multiple_of: int) -> dict:
    """When a cut of this model keeps its family: the query-head counts its config class accepts
    (all, or the divisors of hidden_size for a family written as another, Llama as Mistral)."""
    other = FAMILIES[model_type].written_as
    counts = sorted({kv * g for kv, g in head_layouts(spec, multiple_of)})
    if other is None:
        return {"written_as": None, "head_counts": counts}
    return {"written_as": other, "head_counts": [n for n in counts if spec.hidden % n == 0]}


