"""A run, step by step (docs/design.md): check everything that can be checked up front, lock the
output and open the journal, measure the input's perplexity, survey, allocate, run the pruning
pass (pruning_pass.py), write the model files and the report, measure the output's perplexity.
Only the orchestration and the I/O modules touch files; the math lives in block/scoring/slicing."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
import uuid
from pathlib import Path

from ..arch.families import bias_sublayers
from ..arch.model import Model, model_compute_dtype
from ..checks.validate import check_free_disk
from ..config import SURVEY_FREE, RunConfig
from ..device import check_device
from ..errors import StreamPruneError
from ..inputs.calibration import write_embeddings
from ..output.model_card import base_model_name, write_card
from ..pruning.allocation import allocate
from ..pruning.numerics import GramPlacement
from ..pruning.ranks import Ranks
from ..pruning.shape import Shape, cut_sublayers, shape_of
from ..store.cache import ActivationCache, cache_owner, run_cache_folder
from ..store.faults import fault_point
from ..store.fsutil import atomic_write, atomic_write_json, remove_temporaries
from ..store.journal import WORKDIR, Journal, survey_from
from ..store.lock import OutputLock
from ..store.modelfiles import OUTPUT_FILES, companion_files, input_fingerprint
from ..store.records import expect, read_checked_json
from ..store.runlog import FILE_ONLY, TERMINAL_ONLY, run_log
from ..store.safetensors_header import read_header
from ..store.shard_writer import OutTensor, shard_name, write_safetensors
from ..store.shards import INDEX
from .checked import Checked, cache_folder_of, check_run
from .context import RunContext
from .distributed import join_ranks, other_rank_cache_folders, shared_micro_batch, window_share
from .pruning_pass import BlockRunner
from .run_eval import attach_eval, eval_text_key, journaled_eval
from .run_report import build_report
from .survey import SurveyOnly, survey, survey_previews

log = logging.getLogger(__name__)


def clear_output(out: Path, cache_folder: Path) -> None:
    """Forget a previous run in `out`, a folder streamprune wrote: its journal and the files a run
    writes (shards, config, index, report). The lock, held by this run, stays; the activation
    cache (`cache_folder`) is cleared when the new run claims it."""
    for p in [out / WORKDIR / "journal.json", *out.glob("model-*.safetensors*"), *(out / n for n in OUTPUT_FILES)]:
        p.unlink(missing_ok=True)
    for folder in other_rank_cache_folders(cache_folder):  # the other ranks' caches of an earlier torchrun job
        if folder.is_dir() and not folder.is_symlink() and (cache_owner(folder) or {}).get("out") == str(out.resolve()):
            ActivationCache(folder, 0, 0, 0).remove()


def copy_file(src: Path, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f)


def write_model_files(cfg: RunConfig, model: Model, out_config: dict, report: dict) -> None:
    """Everything but the block shards; the index, which makes the folder loadable, comes last."""
    n = model.arch.n_layers + 1
    rest = shard_name(n, n)
    write_safetensors(cfg.out / rest, [OutTensor.copy(name, model.index) for name in model.arch.other_tensors()])
    fault_point("final_files")
    for src in companion_files(model.folder):
        atomic_write(cfg.out / src.name, lambda f, src=src: copy_file(src, f))
    fault_point("final_files")
    atomic_write_json(cfg.out / "config.json", out_config)
    fault_point("final_files")
    atomic_write_json(cfg.out / "report.json", report)
    write_card(cfg.out, report, base_model_name(cfg.shards))
    fault_point("final_files")
    weight_map, total = {}, 0
    for k in range(1, n + 1):
        for name, info in read_header(cfg.out / shard_name(k, n)).items():
            weight_map[name] = shard_name(k, n)
            total += info.nbytes
    atomic_write_json(cfg.out / INDEX,
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def run(cfg: RunConfig, model_checked: bool = False) -> dict | SurveyOnly | None:
    """Prune cfg.shards into cfg.out; resumes from the journal. Returns the report (None on the
    ranks other than 0 of a torchrun job: rank 0 reports), or with --survey-only the survey's
    previews. `model_checked`: checked.check_before_model ran already."""
    ranks = join_ranks(cfg.device)
    try:
        if not ranks.is_writer:
            cfg = dataclasses.replace(cfg, progress=False)
        return run_ranks(cfg, ranks, model_checked)
    finally:
        ranks.close()


def run_ranks(cfg: RunConfig, ranks: Ranks, model_checked: bool = False) -> dict | SurveyOnly | None:
    checked, early = check_run(cfg, ranks, time.time(), model_checked)
    if not ranks.is_writer:  # rank 0 holds the lock for the whole job
        return run_locked(checked, early)
    with OutputLock(checked.cfg.out):
        return run_locked(checked, early)


def ensure_inputs(ctx: RunContext, start: int) -> None:
    """The cache holds the inputs of block `start`, where a pass (survey or pruning) begins or
    resumes: block 0's are the embeddings (of this rank's windows), written now; a later block's
    must be there already, on every rank."""
    cache, ranks = ctx.cache, ctx.ranks
    if start >= ctx.model.arch.n_layers:
        return
    if start == 0 and not cache.has(0):
        write_embeddings(cache, ctx.model.index, ctx.tokens, ctx.batch)
    missing = ranks.sum_float(float(not cache.has(start)))  # every rank stops alike
    if missing:
        where = f"; on {int(missing)} of {ranks.world} ranks" if ranks.world > 1 else ""
        raise StreamPruneError(f"activation cache for block {start} is missing ({cache.path(start)}{where}); "
                               "re-run with --restart")


def decide_shape(ctx: RunContext, journal: Journal) -> Shape:
    """Every block's sizes: the fixed rule, or from the survey's measured costs (run now for the
    blocks not surveyed yet) by the allocation asked for."""
    cfg = ctx.cfg
    if cfg.allocation == "rule":
        return ctx.rule
    costs = measured_costs(ctx, journal)
    sizes = allocate(cfg.allocation, ctx.model.arch.blocks, costs, cfg.sparsity, cfg.alignment)
    return shape_of(ctx.model, sizes, cfg.compensation.needs_biases, tuple(c.ridges for c in costs))


def measured_costs(ctx: RunContext, journal: Journal) -> list:
    """The survey's costs of every block (run now for the blocks not surveyed yet)."""
    ensure_inputs(ctx, len(journal.surveyed))
    return survey(ctx, journal)


def warn_uncompensated(cfg: RunConfig, model: Model, shape: Shape) -> None:
    """Mean compensation needs output biases, which some output families cannot carry."""
    if not cfg.compensation.needs_biases:
        return
    cut = frozenset().union(*(cut_sublayers(b, s) for b, s in zip(model.arch.blocks, shape.sizes)))
    missing = cut - bias_sublayers(shape.config)
    if missing:
        log.warning("--compensate %s: a %s output has no bias for %s, which stays uncompensated",
                    cfg.compensate, shape.config["model_type"], " or ".join(sorted(missing)))


def open_journal(checked: Checked) -> tuple[Journal, bool]:
    """Rank 0 opens (or resumes) the journal and pins the micro-batch and the run's id; every rank
    gets its state (the others an in-memory copy). Also: whether the output is already complete."""
    cfg, model, memory, ranks = checked.cfg, checked.model, checked.memory, checked.ranks
    if not ranks.is_writer:
        state, done = ranks.broadcast(None)
        return Journal.copy(state), done
    if cfg.restart:
        clear_output(cfg.out, run_cache_folder(cfg.out, cfg.out / WORKDIR, cfg.cache_dir))
    input_files = {t.file for t in model.index.tensors.values()}
    fingerprint = dict(cfg.fingerprint(), **input_fingerprint(model.folder, input_files))
    if ranks.world > 1:  # float sums, and so the output bytes, depend on how the windows are split
        fingerprint["processes"] = ranks.world
    survey = None if cfg.survey_from is None else (
        lambda: survey_from(cfg.survey_from, fingerprint, SURVEY_FREE, model.arch.n_layers))
    journal = Journal.open(cfg.out, fingerprint, cfg.restart, checked.started, SURVEY_FREE, survey)
    # a resumed run keeps its micro-batch: float sums depend on it, and resume must be byte-identical
    journal.pin("micro_batch", memory.micro_batch if ranks.world == 1 else
                shared_micro_batch(memory.micro_batch, cfg.samples, ranks.world))
    journal.pin("run", uuid.uuid4().hex)  # the activation cache belongs to this run
    # and where its Gram matrices live: a resume with another --max-memory must not move them (float sums)
    journal.pin("grams", memory.placement.as_dict())
    # and whether the output pass takes the last MLP pass's activations (float sums differ): an older
    # run that pruned blocks without it goes on without it
    journal.pin("keep_mlp", memory.keep_mlp_bytes > 0 and journal.next_block == 0)
    done = journal.complete and (cfg.out / INDEX).is_file()
    ranks.broadcast((journal.state, done))
    return journal, done


def run_locked(checked: Checked, early: list) -> dict | SurveyOnly | None:
    """The run proper, with the output folder locked against a second run (by rank 0); logged to
    OUT/streamprune.log (by rank 0), `early` first (what the checks said)."""
    cfg, model, memory, ranks = checked.cfg, checked.model, checked.memory, checked.ranks
    journal, done = open_journal(checked)
    with run_log(cfg.out, early) if ranks.is_writer else contextlib.nullcontext():
        if journal.replaced:
            log.warning("%s held a run with other arguments that had not started (nothing done); starting over",
                        cfg.out)
        if journal.reused_survey:
            log.info("reusing the survey of %d blocks %s (it depends on none of: %s)", journal.reused_survey,
                     f"from {cfg.survey_from}" if cfg.survey_from else f"in {cfg.out}", ", ".join(SURVEY_FREE))
        batch, run_id = journal.state["micro_batch"], journal.state["run"]
        share = window_share(ranks, cfg.samples, batch)
        cache = ActivationCache.claim(cache_folder_of(cfg, ranks), cfg.out, run_id, len(share.windows), cfg.seq_len,
                                      model.arch.hidden, model_compute_dtype(model, check_device(cfg.device)))
        for folder in ((cfg.out, cfg.out / WORKDIR) if ranks.is_writer else ()) + (cache.folder,):
            remove_temporaries(folder)
        placement = GramPlacement.of(journal.state["grams"])
        ctx = RunContext.build(cfg, model, cache, checked.tokens, batch, placement, ranks, checked.rule,
                               resident=memory.resident_bytes > 0, keep_mlp=journal.state["keep_mlp"])
        if done:
            report = finished_report(ctx, journal) if ranks.is_writer else None
        else:
            part = len(share.windows) / cfg.samples
            check_free_disk(cfg.out, cache.folder, memory.output_bytes if ranks.is_writer else 0,
                            round(memory.cache_bytes * part))
            report = prune(ctx, journal)
        if not cfg.keep_cache:
            cache.remove()  # (of a complete run: one killed while deleting its cache)
        return report


def prune(ctx: RunContext, journal: Journal) -> dict | SurveyOnly | None:
    """Survey, prune and write what the journal does not hold yet; evaluate before and after with
    --eval. With several ranks, this rank's share of the windows; rank 0 writes and returns the
    report, the others None."""
    cfg, model, cache, ranks = ctx.cfg, ctx.model, ctx.cache, ctx.ranks
    session = journal.start_session()
    log.info("%s run: %s -> %s, sparsity %g, %d windows of %d tokens, micro-batch %d, method %s, allocation %s%s",
             "resuming the" if session > 1 else "starting a", cfg.shards, cfg.out, cfg.sparsity, cfg.samples,
             cfg.seq_len, ctx.batch, cfg.method, cfg.allocation,
             f", {ranks.world} processes" if ranks.world > 1 else "")
    if cfg.survey_only:
        costs = measured_costs(ctx, journal)
        log.info("survey done: %s (prune from it: the same command without --survey-only, plus --survey-from %s "
                 "--out NEW, at any sparsity)", cfg.out, cfg.out)
        return survey_previews(cfg, model.arch, costs) if ranks.is_writer else None
    if cfg.eval_source() is not None and ranks.world == 1:  # the input's perplexity, once (journaled), before pruning
        journaled_eval(cfg, journal, "before", model.folder, cache.folder)  # (several ranks: rank 0's, at the end)
    shape = decide_shape(ctx, journal)
    if ranks.is_writer:
        warn_uncompensated(cfg, model, shape)

    L, start = model.arch.n_layers, journal.next_block
    ensure_inputs(ctx, start)
    if start < L:
        log.info("pruning: %d blocks%s", L, f" (resuming: {start} of {L} blocks done)" if start else "",
                 extra={} if start else FILE_ONLY)  # the bar says the rest
        runner = BlockRunner(ctx, shape)
        try:
            t_blocks = time.time()
            runner.prune_blocks(journal, start)
            journal.add_blocks_seconds(time.time() - t_blocks)
        finally:
            runner.close()
    if not ranks.is_writer:  # rank 0 writes the rest and measures perplexity
        return None
    report = build_report(ctx, shape, journal)
    write_model_files(cfg, model, shape.config, report)
    log.info("written: %s (%.1fs of setup, survey, pruning and writing)", cfg.out, report["timing"]["seconds"],
             extra=FILE_ONLY)
    report = attach_eval(cfg, journal, report, cache.folder)
    journal.finish()
    p = report["block_params"]
    log.info("finished: block params %s -> %s (%.1f%% removed); %.1fs in all, %d session%s", f"{p['before']:,}",
             f"{p['after']:,}", 100 * p["removed_fraction"], journal.wall_seconds, journal.sessions,
             "s" if journal.sessions > 1 else "", extra=FILE_ONLY)
    return report


def finished_report(ctx: RunContext, journal: Journal) -> dict:
    """A complete run, re-run: its report.json left as it is, unless --eval asks for a perplexity it
    does not hold yet (measured now) or it is missing (rebuilt from the journal)."""
    cfg, cache = ctx.cfg, ctx.cache
    report, problem = read_checked_json(cfg.out / "report.json", lambda r: expect(r, (dict,), "the report"))
    if problem:
        report = build_report(ctx, decide_shape(ctx, journal), journal)  # (the shape from the journal)
        atomic_write_json(cfg.out / "report.json", report)
    held = report.get("eval") or {}
    if cfg.eval_source() is None or eval_text_key(cfg) == (held.get("text_sha256"), held.get("seq_len")):
        log.info("already complete: %s (nothing to do)", cfg.out, extra=TERMINAL_ONLY)  # the log is left alone too
        return report
    log.info("already complete: %s; measuring perplexity on %s", cfg.out, cfg.eval_source().describe())
    return attach_eval(cfg, journal, report, cache.folder)
