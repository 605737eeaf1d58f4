"""streamprune: structured pruning of Llama-family LLMs, one decoder block in memory at a time."""

import os as _os

# Intel MKL picks kernels by memory alignment unless told otherwise, so the same matmul can give
# different low bits in two processes; resume must be byte-identical, so ask for reproducible
# results (must be set before MKL's first call; a value the user set wins).
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .version import __version__  # noqa: E402, F401  (pyproject.toml reads it too)

__all__ = ["prune", "PruneResult", "StreamPruneError", "load_pretrained"]


def __getattr__(name):
    """The API (api.prune, its PruneResult and StreamPruneError; output.loading.load_pretrained),
    imported on first use: `import streamprune` stays light (no torch, no transformers), so the
    command's signal handlers are armed before anything heavy is imported (__main__.py)."""
    if name in ("prune", "PruneResult"):
        from . import api
        return getattr(api, name)
    if name == "StreamPruneError":
        from .errors import StreamPruneError
        return StreamPruneError
    if name == "load_pretrained":
        from .output.loading import load_pretrained
        return load_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
