"""streamprune's vLLM plugin: installed beside vLLM, streamprune registers (entry point group
`vllm.general_plugins`, pyproject.toml) the model classes of its outputs whose blocks have different
shapes, so `vllm serve OUT` and `LLM(model=OUT)` run them with no flags. Outputs with one shape
in every block name vLLM's own classes and never reach these. The classes (vllm_models.py) are
imported only when vLLM builds such a model."""

from __future__ import annotations

from ..arch.families import FAMILIES


def architectures() -> dict[str, str]:
    """config.json architecture name -> "module:class" of its vLLM model, for every family."""
    return {f.per_block_architecture: f"{__package__}.vllm_models:{f.per_block_architecture}"
            for f in FAMILIES.values()}


def register() -> None:
    """vLLM calls this in each of its processes at start."""
    from vllm import ModelRegistry
    for name, where in architectures().items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, where)
