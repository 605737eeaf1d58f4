"""The output's config.json: the input's, with the pruned shapes, in a form stock transformers
reads. One shape for every block: a stock config (pruned_config) that every loader builds.
Blocks of different shapes: transformers' per-layer configuration (heterogeneous_config), which
streamprune.load_pretrained builds (docs/output-format.md)."""

from __future__ import annotations

import copy

from ..errors import StreamPruneError
from .families import FAMILIES, PER_LAYER_SHAPE, architecture, hf_config


def pruned_config(config: dict, n_heads: int, n_kv: int, intermediate: int, biases=()) -> dict:
    """config.json for the pruned model, in a form stock transformers loads, with bias slots for
    the sublayers in `biases` where the family has them (BIAS_KEYS).

    LlamaConfig insists on hidden_size % num_attention_heads == 0, which most pruned head
    counts break. Mistral's architecture is the same computation as Llama's (no biases, same
    RMSNorm, rotary and SwiGLU) and accepts any head count with an explicit head_dim, so such a
    Llama is written as a Mistral with sliding_window null (Family.written_as; see
    docs/output-format.md)."""
    out = base_config(config)
    out.update(num_attention_heads=n_heads, num_key_value_heads=n_kv, intermediate_size=intermediate)
    if out["hidden_size"] % n_heads:
        write_as_other_family(out, f"{n_heads} heads do not divide hidden_size {out['hidden_size']}")
    out["architectures"] = [FAMILIES[out["model_type"]].output_architecture(out)]
    add_bias_keys(out, biases)
    hf_config(out)  # raises if transformers would refuse it
    return out


def heterogeneous_config(config: dict, per_layer: list[dict | None], biases=()) -> dict:
    """config.json for a model whose blocks were cut to different shapes: `per_layer[i]` is block
    i's {"n_heads", "n_kv", "intermediate"}, or None when the block is dropped.

    Dropped blocks are removed and the rest renumbered (num_hidden_layers shrinks), so a model
    whose kept blocks share one shape is still a stock config that every loader reads; that case
    is pruned_config's output exactly (byte-identical when nothing is dropped). Otherwise the
    input's shape stays the global one and each block that differs gets its sizes in
    transformers' `per_layer_config` (keys zero-padded as transformers writes them). Stock
    transformers 5.x reads that config but cannot build the model (it refuses loudly):
    streamprune.load_pretrained can. `biases` as in pruned_config, for every block."""
    if len(per_layer) != config["num_hidden_layers"]:
        raise ValueError(f"{len(per_layer)} block shapes for {config['num_hidden_layers']} layers")
    kept = [i for i, shape in enumerate(per_layer) if shape is not None]
    if not kept:
        raise StreamPruneError("every block would be dropped")
    shapes = [_layer_shape(i, per_layer[i]) for i in kept]
    if len(set(shapes)) == 1:
        out = pruned_config(config, *shapes[0], biases)
    else:
        out = _per_layer_config(config, shapes, biases)
    if len(kept) < len(per_layer):
        _drop_layers(out, config, kept)
    _check_layer_shapes(out, shapes)
    return out


def check_per_block_writable(arch) -> None:
    """--allocation global writes blocks of different shapes: refuse up front, before the survey,
    a model whose config transformers cannot read with per-layer shapes (its rope validation reads
    sizes that become per-layer, as longrope's does), so no run writes what its loader refuses."""
    if not arch.uniform or arch.blocks[0].intermediate < 2:
        return
    if arch.n_layers < 2:
        return
    b = arch.blocks[0]
    trial = [{"n_heads": 1, "n_kv": 1, "intermediate": b.intermediate - 1} if i == 0 else  # every size per layer
             {"n_heads": b.n_heads, "n_kv": b.n_kv, "intermediate": b.intermediate} for i in range(arch.n_layers)]
    try:
        heterogeneous_config(arch.config, trial)
    except StreamPruneError as e:
        raise StreamPruneError(f"--allocation global writes blocks of different shapes, and this model's config "
                               f"cannot say so ({str(e).removeprefix('config.json: ')[:160]}); use --allocation "
                               "uniform") from None


def _layer_shape(i: int, shape: dict) -> tuple[int, int, int]:
    """(n_heads, n_kv, intermediate) of block i, refused when no decoder layer can have it."""
    if set(shape) != set(PER_LAYER_SHAPE):
        raise ValueError(f"block {i}: shape keys must be {sorted(PER_LAYER_SHAPE)}, got {sorted(shape)}")
    n_heads, n_kv, inter = (int(shape[k]) for k in PER_LAYER_SHAPE)
    if n_kv < 1 or n_heads < n_kv or n_heads % n_kv or inter < 1:
        raise StreamPruneError(f"block {i}: {n_heads} heads, {n_kv} KV heads, {inter} neurons is not a valid "
                               "layer (at least one KV group, each with the same number of query heads, and a neuron)")
    return n_heads, n_kv, inter


def _per_layer_config(config: dict, shapes: list[tuple[int, int, int]], biases) -> dict:
    """The input's config with per-layer overrides for the blocks whose shape differs from it.
    LlamaConfig validates hidden_size % num_attention_heads on the global value, which transformers
    refuses to read once heads vary per layer; such a Llama is written as the Mistral it computes
    exactly (see pruned_config)."""
    out = base_config(config)
    out.update(num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"])
    overrides = {}
    for j, shape in enumerate(shapes):
        differ = {key: n for key, n in zip(PER_LAYER_SHAPE.values(), shape) if n != out[key]}
        if differ:
            overrides[j] = differ
    width = len(str(max(overrides)))
    out["per_layer_config"] = {str(j).zfill(width): o for j, o in overrides.items()}
    if any("num_attention_heads" in o for o in overrides.values()):
        write_as_other_family(out, "the head count differs per block")
    # a class only streamprune's vLLM plugin registers: engines that build every layer from the global
    # sizes refuse the folder by name instead of meeting tensors of other shapes
    out["architectures"] = [FAMILIES[out["model_type"]].output_architecture(out)]
    add_bias_keys(out, biases)
    return out


def base_config(config: dict) -> dict:
    """The input's config.json as the start of the output's: built from stock classes only (no
    auto_map), its own per-layer overrides gone, head_dim written out (heads will change)."""
    import transformers
    out = copy.deepcopy(config)
    out["transformers_version"] = transformers.__version__  # the version that validated it, as save_pretrained writes
    out.pop("auto_map", None)
    out.pop("per_layer_config", None)
    out["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return out


def write_as_other_family(out: dict, why: str) -> None:
    """Rewrite `out` as its family's `written_as` (a Llama as the Mistral it computes exactly), for
    head counts the family's config class refuses."""
    other = FAMILIES[out["model_type"]].written_as
    if other is None:
        return
    if out.get("attention_bias") or out.get("mlp_bias"):
        raise StreamPruneError(f"{why} and a {out['model_type']} with biases has no stock equivalent "
                               f"({FAMILIES[out['model_type']].prefix}Config refuses the head count); keep the head "
                               "count a divisor of hidden_size and the same in every block")
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        out.pop(key, None)
    out.update(model_type=other, architectures=[FAMILIES[other].architecture_name], sliding_window=None)


def family_change(config: dict, out: dict) -> str | None:
    """Why the output `out` is written in another family than the input `config`, in a sentence
    (None when it is not)."""
    if out["model_type"] == config["model_type"]:
        return None
    before, after = FAMILIES[config["model_type"]].prefix, FAMILIES[out["model_type"]].prefix
    heads = {o["num_attention_heads"] for o in out.get("per_layer_config", {}).values() if "num_attention_heads" in o}
    if heads:
        why = "the number of query heads differs from block to block"
    else:
        why = f"{out['num_attention_heads']} query heads do not divide hidden_size {out['hidden_size']}"
    return (f"{before}Config needs num_attention_heads to divide hidden_size, and {why}; {after} computes the same "
            f"block (no biases, same norms, rotary and MLP) with head_dim {out['head_dim']} written out, so the "
            f"output is a {out['model_type']} with sliding_window null (docs/output-format.md)")


def add_bias_keys(out: dict, biases) -> None:
    """Switch on the bias keys of the sublayers in `biases` where the output family has them."""
    keys = dict(FAMILIES[out["model_type"]].bias_keys)
    for sublayer in biases:
        if sublayer in keys:
            out[keys[sublayer]] = True


def _drop_layers(out: dict, config: dict, kept: list[int]) -> None:
    """Renumber to the kept blocks. Per-layer attention types (Qwen2/Qwen3 sliding windows) are
    written explicitly, since the rule that derives them (max_window_layers) counts layers."""
    out["num_hidden_layers"] = len(kept)
    layer_types = getattr(hf_config(config), "layer_types", None)
    if layer_types is not None and out["model_type"] == config["model_type"]:
        kept_types = [layer_types[i] for i in kept]
        if "layer_types" in config or set(kept_types) != {"full_attention"}:
            out["layer_types"] = kept_types


def _check_layer_shapes(out: dict, shapes: list[tuple[int, int, int]]) -> None:
    """The output config read back as the loader reads it (families.architecture: transformers'
    per-layer configs, rotary tables included) gives every block the shape written (nothing
    dropped or misnumbered)."""
    for j, (block, shape) in enumerate(zip(architecture(out).blocks, shapes, strict=True)):
        got = (block.n_heads, block.n_kv, block.intermediate)
        if got != shape:
            raise AssertionError(f"layer {j}: config reads back {got}, {shape} was written")
