"""The checks that refuse a run before it writes anything: paths, texts, sparsity, free disk."""
