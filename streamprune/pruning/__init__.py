"""The pure math of pruning: the block forward, scoring, selection, slicing, compensation, the
costs of cuts and the allocation of one budget over the blocks. Functions over tensors; nothing
here opens a file (tests/test_layout.py: no import of store/)."""
