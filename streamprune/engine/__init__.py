"""The streaming engine: the checks before a run (checked), one walk over the blocks (stream), the
run context, the survey, the pruning pass, streaming evaluation, data-parallel ranks, and the
run's steps (pipeline)."""
