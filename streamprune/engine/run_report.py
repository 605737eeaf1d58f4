"""report.json of a run, built from its journal: the arguments, the cut, every block's record,
the parameters removed, and the time (over every session, per phase, in dense passes) and peak
memory."""

from __future__ import annotations

import resource

import torch

from ..arch.families import bias_sublayers
from ..config import NOT_FINGERPRINTED
from ..pruning.phases import add_phases
from ..pruning.shape import Shape
from ..store.journal import Journal
from .context import RunContext


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started: Linux's VmHWM. (ru_maxrss also counts
    the parent's memory at the moment it spawned this process, so a run launched from a large
    Python process would report that process's size.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def work_seconds(journal: Journal) -> float:
    """The run's time over all its sessions, less the perplexity measurements journaled so far:
    setup, survey, pruning and writing."""
    evals = sum(journal.eval_result(w)["seconds"] for w in ("before", "after") if journal.eval_result(w))
    return round(max(0.0, journal.wall_seconds - evals), 3)


def build_report(ctx: RunContext, shape: Shape, journal: Journal) -> dict:
    cfg, model, out_config = ctx.cfg, ctx.model, shape.config
    blocks = [journal.record(i) for i in range(model.arch.n_layers)]
    before = sum(b["params"][0] for b in blocks)
    after = sum(b["params"][1] for b in blocks)
    return {
        "arguments": {k: v for k, v in cfg.as_dict().items() if k not in NOT_FINGERPRINTED},
        "model": {"model_type": model.arch.model_type, "layers": model.arch.n_layers,
                  "output_model_type": out_config["model_type"]},
        "plan": dict(shape.describe(), allocation=cfg.allocation, **ctx.placement.as_dict(),
                     biases_added=sorted(bias_sublayers(out_config) - bias_sublayers(model.arch.config))),
        "blocks": [{k: v for k, v in b.items() if k != "timing"} for b in blocks],
        "block_params": {"before": before, "after": after, "removed_fraction": 1 - after / before},
        "timing": {"seconds": work_seconds(journal), **dense_passes(journal),
                   "wall_seconds_total": journal.wall_seconds, "sessions": journal.sessions,
                   "blocks_seconds": journal.blocks_seconds,
                   "peak_rss_bytes": peak_rss_bytes(), "micro_batch": ctx.batch, "resident": ctx.resident,
                   "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
                   "phases": phase_totals(blocks, journal), "blocks": [b["timing"] for b in blocks]},
    }


DENSE_PASS_PHASES = ("shard_read", "to_device", "cache_read", "dense_forward", "cache_write")


def dense_passes(journal: Journal) -> dict:
    """The run's time in dense streaming forwards of the model over its calibration windows
    (`dense_pass_seconds`, measured in the survey), where the survey measured one."""
    one = dense_pass_seconds(journal)
    if one is None:
        return {}
    return {"dense_pass_seconds": one, "dense_passes": round(work_seconds(journal) / one, 2) if one > 0 else None}


def dense_pass_seconds(journal: Journal) -> float | None:
    """Seconds of one dense streaming forward over the calibration windows, measured inside the
    run: the survey's reads, forwards and cache writes, without its statistics (the yardstick of
    the run's time, report.json's `dense_passes`). None without a survey, or with one recorded before
    its phases were (a tiny run's, whose phases round to 0.000 s, still has one: what a report holds
    does not depend on a rounded time)."""
    records = list(journal.surveyed.values())
    if not records:
        return None
    phases = add_phases({}, {})
    for record in records:
        add_phases(phases, record.get("phases", {}))
    seconds = sum(phases.get(k, 0.0) for k in DENSE_PASS_PHASES)
    return round(seconds, 3) if "dense_forward" in phases else None


def phase_totals(blocks: list[dict], journal: Journal) -> dict:
    """Seconds per phase over all blocks: the survey's and the pruning pass's (phases.py); shard
    reads and writes run on threads beside the computation."""
    survey, prune = {}, {}
    for record in journal.surveyed.values():
        add_phases(survey, record.get("phases", {}))
    for b in blocks:
        t = b.get("timing", {})
        add_phases(prune, dict(t.get("phases", {}), shard_read=t.get("read_seconds", 0.0),
                               shard_write=t.get("write_seconds", 0.0)))
    return {"survey": survey, "prune": prune}
