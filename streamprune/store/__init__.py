"""Storage and state: safetensors shards, the on-disk activation cache, the journal and its
records, the output lock, the run's log, atomic writes, text sources, fault injection points."""
