"""streamprune: structured pruning of Llama-family LLMs, one decoder block in memory at a time."""

__version__ = "0.1.0"
