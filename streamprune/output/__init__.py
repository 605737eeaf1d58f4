"""What a run leaves for its users: the loader of per-layer shapes, the GGUF export, the model
card and the report's rendering."""
