"""The run's texts: one calibration source and at most one held-out text, given; the calibration
windows fitted to the text and the model (inputs/calibration.py cuts them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..arch.model import Model
from ..config import RunConfig
from ..errors import StreamPruneError
from ..inputs.calibration import (
    bos_id,
    fit_windows,
    load_tokenizer,
    max_window,
    run_window,
    tokenize_file,
)


def check_text_sources(cfg: RunConfig) -> None:
    """One calibration source, given: a file (plain text, JSON lines, Parquet) or a dataset; at
    most one held-out text."""
    if cfg.calib is None and cfg.calib_dataset is None:
        raise StreamPruneError("--calib FILE is required (text in the model's domain; or --calib-dataset NAME)")
    if cfg.calib is not None and cfg.calib_dataset is not None:
        raise StreamPruneError("give --calib or --calib-dataset, not both")
    if cfg.calib is not None and not Path(cfg.calib).is_file():
        raise StreamPruneError(f"text file not found: {cfg.calib}")
    if cfg.eval is not None and cfg.eval_dataset is not None:
        raise StreamPruneError("give --eval or --eval-dataset, not both")


def fitted_windows(cfg: RunConfig, model: Model) -> tuple[RunConfig, list[int], int | None, str | None]:
    """cfg with the window count and length the run uses (the defaults fitted to the text
    and the model, values the user set kept or refused), the text's token ids, the BOS id, and
    what was changed and why (None: nothing)."""
    tokenizer = load_tokenizer(model.folder)
    ids, bos = tokenize_file(tokenizer, cfg.calib_source()), bos_id(tokenizer)
    config = model.arch.config
    seq_len = run_window(config, cfg.seq_len, cfg.adaptable)
    samples, seq_len = fit_windows(len(ids), cfg.samples, seq_len, bos is not None, cfg.adaptable)
    capped = min(cfg.seq_len, max_window(config))
    reasons = ([f"max_position_embeddings is {max_window(config)}"] if capped < cfg.seq_len else []) + \
        ([f"the calibration text has {len(ids):,} tokens"] if (samples, seq_len) != (cfg.samples, capped) else [])
    note = None
    if reasons:
        changed = [f"--{option} {new:,} (not {old:,})" for option, new, old in
                   (("samples", samples, cfg.samples), ("seq-len", seq_len, cfg.seq_len)) if new != old]
        note = f"using {' and '.join(changed)}: {' and '.join(reasons)} (set --samples and --seq-len to choose)"
    return dataclasses.replace(cfg, samples=samples, seq_len=seq_len), ids, bos, note
