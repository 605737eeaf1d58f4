"""A run's perplexity measurements (--eval): the input's before pruning and the output's after,
each journaled once, and attached to the report."""

from __future__ import annotations

import logging
from pathlib import Path

from ..arch.families import read_config
from ..config import RunConfig
from ..output.model_card import base_model_name, write_card
from ..store.fsutil import atomic_write_json
from ..store.journal import Journal
from ..store.runlog import FILE_ONLY
from .evaluate import choose_seq_len, perplexity

log = logging.getLogger(__name__)


def journaled_eval(cfg: RunConfig, journal: Journal, which: str, folder: Path, cache_folder: Path) -> dict:
    """The perplexity of `folder` ("before": the input, "after": the output) on the held-out text
    (--eval or --eval-dataset), from the journal when it was already measured on the same text and
    window, else measured now (its temporary cache inside the run's own cache folder)."""
    sha, seq_len = eval_text_key(cfg)
    done = journal.eval_result(which)
    if done and done["text_sha256"] == sha and done["seq_len"] == seq_len:
        return done
    label = EVAL_PHASES[which]
    log.info("%s: perplexity on %s, windows of %d tokens", label, cfg.eval_source().describe(), seq_len,
             extra=FILE_ONLY)
    result = perplexity(folder, cfg.eval_source(), seq_len, cfg.device, cfg.batch_size, cache_dir=cache_folder,
                        progress=cfg.progress, label=label).as_dict()
    journal.record_eval(which, result)
    log.info("%s: perplexity %.4f over %d windows of %d tokens (%.1fs)", label, result["ppl"], result["windows"],
             result["seq_len"], result["seconds"])
    return result


EVAL_PHASES = {"before": "evaluating input (before)", "after": "evaluating output (after)"}


def eval_text_key(cfg: RunConfig) -> tuple[str | None, int]:
    """(sha256 of the held-out text, window) that a perplexity measured now would have."""
    seq_len = choose_seq_len(read_config(cfg.shards), cfg.eval_seq_len, "--eval-seq-len")
    source = cfg.eval_source()
    return source.sha256() if source.kind == "dataset" or Path(source.file).is_file() else None, seq_len


def attach_eval(cfg: RunConfig, journal: Journal, report: dict, cache_folder: Path) -> dict:
    """Add {"eval": ...} (before and after) to a finished run's report and rewrite report.json.
    No-op without --eval or --eval-dataset."""
    source = cfg.eval_source()
    if source is None:
        return report
    before = journaled_eval(cfg, journal, "before", Path(cfg.shards), cache_folder)
    after = journaled_eval(cfg, journal, "after", Path(cfg.out), cache_folder)
    report = dict(report, eval={
        "text": source.describe(), "text_sha256": before["text_sha256"], "seq_len": before["seq_len"],
        "windows": before["windows"], "tokens": before["tokens"],
        "ppl_before": before["ppl"], "ppl_after": after["ppl"],
        "nll_before": before["nll"], "nll_after": after["nll"]})
    report["timing"] = dict(report.get("timing", {}), wall_seconds_total=journal.wall_seconds,
                            eval_seconds={"before": before["seconds"], "after": after["seconds"]})
    atomic_write_json(Path(cfg.out) / "report.json", report)
    write_card(Path(cfg.out), report, base_model_name(cfg.shards))
    return report
