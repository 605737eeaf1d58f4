"""What a model is and what a sparsity would do to it, from config.json and headers only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .model import open_model, output_shape
from .validate import check_sparsity


def describe(folder: Path, sparsity: float) -> dict:
    """Refuses a sparsity that `run` would refuse, with the same check."""
    model = open_model(folder)
    check_sparsity(model.arch.blocks[0], sparsity)
    arch, b = model.arch, model.arch.blocks[0]
    shape = output_shape(model, sparsity)
    sizes, out_config = shape.sizes[0], shape.config
    new_block = dataclasses.replace(b, n_heads=sizes.n_heads, n_kv=sizes.n_kv, intermediate=sizes.intermediate)
    block_params = sum(x.n_params() for x in arch.blocks)
    after = new_block.n_params() * arch.n_layers
    dtypes = sorted({model.index.tensors[n].dtype for n in arch.expected_shapes()})
    params = 0
    for info in model.index.tensors.values():
        n = 1
        for s in info.shape:
            n *= s
        params += n
    return {
        "model_type": arch.model_type, "layers": arch.n_layers, "hidden": arch.hidden,
        "heads": b.n_heads, "kv_heads": b.n_kv, "head_dim": b.head_dim, "neurons": b.intermediate,
        "vocab": arch.vocab, "dtype": "/".join(dtypes), "params": params, "block_params": block_params,
        "plan": {"sparsity": sparsity, "heads": sizes.n_heads, "kv_heads": sizes.n_kv,
                 "neurons": sizes.intermediate, "block_params": after,
                 "removed_fraction": 1 - after / block_params, "output_model_type": out_config["model_type"]},
    }
