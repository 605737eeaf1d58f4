"""What a model is and what a sparsity would do to it, from config.json and headers only."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .config import check_sparsity_range
from .model import Model, open_model, output_shape
from .validate import check_sparsity


def describe(folder: Path | Model, sparsity: float) -> dict:
    """The model's shape and what the fixed rule (--allocation rule) would cut at `sparsity`; the
    measured allocations (uniform, global) decide only after the survey of a run. An input cut per
    block lists each block's shape, and has no fixed-rule plan. Refuses a sparsity that `run`
    would refuse, with the same check. `folder` may be a Model already opened (hub.remote_model)."""
    check_sparsity_range(sparsity)
    model = folder if isinstance(folder, Model) else open_model(folder)
    arch = model.arch
    check_sparsity(arch, sparsity)
    b = arch.blocks[0]
    block_params = sum(x.n_params() for x in arch.blocks)
    dtypes = sorted({model.index.tensors[n].dtype for n in arch.expected_shapes()})
    params = sum(math.prod(info.shape) for info in model.index.tensors.values())
    per_block = lambda f: f(b) if arch.uniform else [f(x) for x in arch.blocks]  # noqa: E731
    info = {
        "model_type": arch.model_type, "layers": arch.n_layers, "hidden": arch.hidden,
        "heads": per_block(lambda x: x.n_heads), "kv_heads": per_block(lambda x: x.n_kv), "head_dim": b.head_dim,
        "neurons": per_block(lambda x: x.intermediate), "vocab": arch.vocab, "dtype": "/".join(dtypes),
        "params": params, "block_params": block_params, "plan": None,
    }
    if arch.uniform:
        shape = output_shape(model, sparsity)
        sizes = shape.sizes[0]
        new_block = dataclasses.replace(b, n_heads=sizes.n_heads, n_kv=sizes.n_kv, intermediate=sizes.intermediate)
        after = new_block.n_params() * arch.n_layers
        info["plan"] = {"allocation": "rule", "sparsity": sparsity, "heads": sizes.n_heads, "kv_heads": sizes.n_kv,
                        "neurons": sizes.intermediate, "block_params": after,
                        "removed_fraction": 1 - after / block_params,
                        "output_model_type": shape.config["model_type"]}
    return info
