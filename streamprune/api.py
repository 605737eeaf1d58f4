"""The Python API: `streamprune.prune(...)` does what `streamprune run` does, with the same options,
defaults, checks and resume, and returns what the run's report says.

    import streamprune
    r = streamprune.prune("./Llama-3-8B", "./Llama-3-8B-p30", sparsity=0.3, calib="calib.txt",
                          eval="heldout.txt")
    print(r.removed_fraction, r.ppl_before, r.ppl_after)

Every refusal, out-of-memory and OS error is raised as `streamprune.StreamPruneError` whose message
is the line the command prints after "error: "."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .errors import StreamPruneError, error_message, one_line

log = logging.getLogger(__name__)

ADAPTABLE = ("samples", "seq_len")  # fitted to the text and the model unless given (as `run` does)
NOT_OPTIONS = ("shards", "out", "sparsity", "calib", "progress")  # prune()'s own arguments


@dataclass(frozen=True)
class PruneResult:
    """What a run did: report.json's figures, and all of it in `report`. With survey_only, the
    survey's costs of every block instead (`costs`, and `model`: what `run --survey-only` previews)."""

    out: Path
    report: dict | None = None
    params_before: int | None = None  # decoder blocks' parameters, before and after
    params_after: int | None = None
    removed_fraction: float | None = None
    seconds: float | None = None  # setup, survey, pruning and writing, over every session (not evaluation)
    dense_passes: float | None = None  # the run's time in dense streaming forwards over its calibration windows
    peak_rss_bytes: int | None = None
    ppl_before: float | None = None  # with an eval text
    ppl_after: float | None = None
    costs: list | None = None
    model: object | None = None  # arch.model.Model, with survey_only

    @classmethod
    def of_report(cls, out: Path, report: dict) -> "PruneResult":
        params, timing, ev = report["block_params"], report["timing"], report.get("eval", {})
        return cls(out, report, params["before"], params["after"], params["removed_fraction"], timing["seconds"],
                   timing.get("dense_passes"), timing["peak_rss_bytes"], ev.get("ppl_before"), ev.get("ppl_after"))


def prune(model: str | Path, out: str | Path, sparsity: float = RunConfig.sparsity, calib: str | Path | None = None,
          *, revision: str | None = None, progress: bool = False, notify=log.info, **options) -> PruneResult:
    """Prune `model` (a folder of safetensors shards, or a Hugging Face Hub id: `revision`) into
    `out` by `sparsity` on the calibration text `calib`; calling it again with the same arguments
    resumes an interrupted run, or returns the finished one's result. `options` are `run`'s other
    options by their RunConfig names, e.g. samples=128, seq_len=2048, device="cuda", method="perturb",
    allocation="global", compensate="lsq", multiple_of=1, calib_dataset=..., eval="heldout.txt",
    max_memory=24 * 2**30, restart=True, survey_only=True. `progress` shows progress bars;
    `notify(text)` is told which Hub snapshot a Hub id resolved to. Raises StreamPruneError (one
    line) for whatever the command refuses."""
    fields = {f.name for f in dataclasses.fields(RunConfig)} - set(NOT_OPTIONS)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise StreamPruneError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                               "see help(streamprune.prune) and streamprune run --help")
    try:
        return run_pruning(model, out, sparsity, calib, revision, progress, notify, options)
    except StreamPruneError as e:
        e.args = (one_line(str(e)),)  # (the same exception: its traceback stays for --debug)
        raise
    except (MemoryError, OSError) as e:
        raise StreamPruneError(one_line(error_message(e))) from e


def run_pruning(model, out, sparsity, calib, revision, progress, notify, options) -> PruneResult:
    from .arch.hub import resolve_model
    from .engine.pipeline import check_before_model, run

    def path(value):
        return Path(value) if isinstance(value, str) else value

    options = {k: path(v) if k in ("cache_dir", "eval") else v for k, v in options.items()}
    options.setdefault("adaptable", tuple(o for o in ADAPTABLE if o not in options))
    cfg = RunConfig(shards=Path(model), out=Path(out), sparsity=sparsity, calib=path(calib), progress=progress,
                    **options)
    check_before_model(cfg)  # before a Hub id's download
    folder = resolve_model(model, revision, progress, notify)
    report = run(dataclasses.replace(cfg, shards=folder))
    if report is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return PruneResult(cfg.out)
    if report.get("survey_only"):
        return PruneResult(cfg.out, costs=report["costs"], model=report["model"])
    return PruneResult.of_report(cfg.out, report)
