"""The checks before a run writes anything, in one place: what can be checked before the model is
read (check_before_model: before a Hub id's download too), then everything else (check_run), which
gives the run its `Checked`: the model, the fitted config and windows, the memory plan."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch.model import Model, open_model
from ..arch.output_config import check_per_block_writable
from ..checks.texts import check_text_sources, fitted_windows
from ..checks.validate import (
    check_folders,
    check_paths,
    check_sparsity,
    check_writable,
    fit_row_multiple,
)
from ..config import RunConfig
from ..device import check_device
from ..errors import StreamPruneError
from ..inputs.calibration import check_tokens_fit, token_windows
from ..planning.advice import refusal
from ..planning.plan import Plan, plan_run
from ..pruning.ranks import Ranks
from ..pruning.shape import Shape, check_uniform, rule_shape
from ..store.cache import check_cache_folder, run_cache_folder
from ..store.journal import WORKDIR, refuse_foreign_folder
from ..store.runlog import FILE_ONLY, held_records
from .distributed import rank_cache_folder

log = logging.getLogger(__name__)


def memory_plan(cfg: RunConfig, model: Model) -> Plan:
    """The micro-batch that fits in --max-memory (or what is free); refuses when none does, with
    the breakdown and the changes that would fit (advice.refusal)."""
    p = plan_run(cfg, model)
    if not p.fits:
        raise StreamPruneError(refusal(cfg, model, p))
    return p


def calibration_tokens(cfg: RunConfig, model: Model) -> tuple[RunConfig, torch.Tensor]:
    """The calibration windows, (samples, seq_len) token ids, and the config with the window count
    and length the run uses (fitted_windows; what was fitted said in a warning). Read before
    anything is written, so a tokenizer or text that does not do is refused up front."""
    cfg, ids, bos, note = fitted_windows(cfg, model)
    if note:
        log.warning("%s", note)
    tokens = token_windows(ids, cfg.samples, cfg.seq_len, bos)
    check_tokens_fit(model.index, tokens)
    return cfg, tokens


def check_before_model(cfg: RunConfig) -> None:
    """What can be checked before the model is read (or downloaded, for a Hub id): the output
    folder (against the input too, when that is a folder), the texts, the device."""
    check_folders(cfg.out, cfg.cache_dir, cfg.survey_from)
    if Path(cfg.shards).is_dir():  # (a Hub id: once it is a folder, check_run checks it)
        check_paths(Path(cfg.shards), cfg.out, cfg.cache_dir)
    refuse_foreign_folder(cfg.out)  # --restart too: it deletes only what a streamprune run writes
    check_text_sources(cfg)
    check_device(cfg.device)


@dataclass(frozen=True)
class Checked:
    """What the checks before any write give the run: the config (windows fitted to the text), the
    input model, the fixed rule's shape (None: blocks of several shapes), the memory plan, every
    calibration window's tokens, the ranks, and when the run started."""

    cfg: RunConfig
    model: Model
    rule: Shape | None
    memory: Plan
    tokens: torch.Tensor
    ranks: Ranks
    started: float


def cache_folder_of(cfg: RunConfig, ranks: Ranks) -> Path:
    return rank_cache_folder(run_cache_folder(cfg.out, cfg.out / WORKDIR, cfg.cache_dir), ranks)


def check_run(cfg: RunConfig, ranks: Ranks, started: float, model_checked: bool = False) -> tuple[Checked, list]:
    """Every check before anything is written, in order, and what they give the run: the model read
    and checked, the kept-count multiples fitted, the cache folder, the sparsities, the output
    family, the fixed rule's shape, the windows fitted to the text, the memory plan. Also the log
    records the checks made (for the run's log file). `model_checked`: check_before_model ran
    already (the API's, before a Hub id's download)."""
    if not model_checked:
        check_before_model(cfg)  # (its check_paths covers the model folder: open_model refuses anything else)
    else:  # a Hub id is a folder now
        check_paths(Path(cfg.shards), cfg.out, cfg.cache_dir)
    model = open_model(cfg.shards)
    cfg, rows_note, rows_lost = fit_row_multiple(cfg, model.arch)  # the default never refuses a model
    check_cache_folder(cache_folder_of(cfg, ranks), cfg.out)
    check_sparsity(model.arch, cfg.sparsity, cfg.alignment)
    if cfg.allocation == "rule" and (cfg.survey_only or cfg.survey_from):
        raise StreamPruneError(f"{'--survey-only measures' if cfg.survey_only else '--survey-from gives'} costs for "
                               "--allocation global or uniform; the fixed rule needs none (streamprune inspect shows "
                               "its cut)")
    for sparsity in cfg.previewed if cfg.survey_only else ():  # (before the survey, not after it)
        check_sparsity(model.arch, sparsity, cfg.alignment)
    if cfg.allocation != "global":
        check_uniform(model.arch, f"--allocation {cfg.allocation}")
    else:
        check_per_block_writable(model.arch)
    # the fixed rule's shape: a model that cannot be written fails now (blocks of one shape only)
    rule = rule_shape(model, cfg.sparsity, cfg.compensation.needs_biases, cfg.alignment) \
        if model.arch.uniform else None
    with held_records() as early:  # what the checks say goes into the log file too
        if rows_note:  # in the log file; on the terminal too where the output loses something by it
            (log.warning if rows_lost else log.info)("%s", rows_note, extra={} if rows_lost else FILE_ONLY)
        cfg, tokens = calibration_tokens(cfg, model)
    if cfg.samples < ranks.world:  # (after the windows are fitted to the text: there may be fewer)
        fitted = " (what the calibration text holds)" if "samples" in cfg.adaptable else ""
        raise StreamPruneError(f"--samples {cfg.samples}{fitted} is fewer than the {ranks.world} processes: "
                               "each needs a window")
    checked = Checked(cfg, model, rule, memory_plan(cfg, model), tokens, ranks, started)
    if ranks.is_writer:  # rank 0 writes the output (and holds its lock)
        check_writable(cfg.out)
    return checked, early
