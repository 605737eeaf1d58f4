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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import RunConfig, options_of, parse_sparsities
from .errors import StreamPruneError, error_message, one_line, user_facing

if TYPE_CHECKING:
    from .pruning.costs import BlockCosts
    from .pruning.preview import BlockShape, Preview

log = logging.getLogger(__name__)

ADAPTABLE = ("samples", "seq_len", "row_multiple")  # fitted to the text and the model unless given (as `run` does)

@dataclass(frozen=True)
class PruneResult:
    """What a run did: report.json's figures, and all of it in `report`. With survey_only, the
    survey's costs of every block instead (`costs`), each block's shape at --sparsity and the
    `preview` sparsities (`previews`) and as it is (`input_blocks`)."""

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
    costs: list[BlockCosts] | None = None
    previews: tuple[Preview, ...] | None = None
    input_blocks: tuple[BlockShape, ...] | None = None

    @classmethod
    def of_report(cls, out: Path, report: dict) -> "PruneResult":
        """The figures of `report`; those a report.json of an older version does not hold are None."""
        params, timing, ev = (report.get(k) if isinstance(report.get(k), dict) else {}
                              for k in ("block_params", "timing", "eval"))
        return cls(out, report, params.get("before"), params.get("after"), params.get("removed_fraction"),
                   timing.get("seconds"), timing.get("dense_passes"), timing.get("peak_rss_bytes"),
                   ev.get("ppl_before"), ev.get("ppl_after"))


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
    given = dict(options, sparsity=sparsity, calib=calib, progress=progress)
    try:
        options = checked_options(given)
        for name, value in (("model", model), ("out", out)):
            if not isinstance(value, (str, os.PathLike)):
                raise StreamPruneError(f"{name} must be a path (str or Path), got {shown(value)}")
        options.setdefault("adaptable", tuple(o for o in ADAPTABLE if o not in given))
        return run_pruning(model, out, revision, notify, options)
    except StreamPruneError as e:
        e.args = (one_line(str(e)),)  # (the same exception: its traceback stays for --debug)
        raise
    except Exception as e:
        if not user_facing(e):
            raise
        raise StreamPruneError(one_line(error_message(e))) from e


# What a value of each kind of option (config.Option.kind, else the default's type) may be, as said
# when it is not; a value of another type is refused naming the option.
KINDS = {"bool": "True or False", "int": "an integer", "float": "a number", "str": "a string", "text": "a string",
         "device": "a string (cpu, cuda or cuda:N)", "choice": "one of {choices}", "file": "a path (str or Path)",
         "folder": "a path (str or Path)", "size": "a size in bytes (an integer, or a string such as '24GiB')",
         "sparsities": "sparsities (a list of numbers, or a string such as '0.2,0.4')",
         "internal": "a tuple of option names"}


def shown(value) -> str:
    """A wrong value as a refusal names it: its repr (cut short) and its type."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def checked_options(given: dict) -> dict:
    """`prune`'s options by the one table (config.RunConfig's fields): an unknown name is refused,
    and every value is checked against its kind and given as the command line gives it (a path as
    a Path, a size string such as "24GiB" as bytes, an integer number as a float)."""
    from .units import parse_bytes
    table = {f.name: (f, how) for f, how in options_of()}
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise StreamPruneError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                               "see help(streamprune.prune) and streamprune run --help")
    out = {}
    for name, value in given.items():
        field, how = table[name]
        kind = how.kind or type(field.default).__name__
        if value is None and field.default is None:
            out[name] = None
        elif kind == "size" and isinstance(value, str):
            try:
                out[name] = parse_bytes(value)
            except StreamPruneError as e:
                raise StreamPruneError(f"{name}: {e}") from None
        elif kind == "sparsities" and isinstance(value, str):
            out[name] = parse_sparsities(value)
        elif kind == "sparsities" and isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out[name] = tuple(float(v) for v in value)
        elif kind in ("file", "folder") and isinstance(value, (str, os.PathLike)):
            out[name] = Path(value)
        elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif (kind in ("int", "size") and isinstance(value, int) and not isinstance(value, bool)
              or kind == "bool" and isinstance(value, bool) or kind == "internal" and isinstance(value, tuple)
              or kind in ("str", "text", "device", "choice") and isinstance(value, str)
              or name == "compensate" and isinstance(value, bool)):  # (True/False: lsq/none, as before)
            out[name] = value
        else:
            what = KINDS[kind].format(choices=", ".join(how.choices))
            raise StreamPruneError(f"{name} must be {what}, got {shown(value)}")
    return out


def run_pruning(model, out, revision, notify, options: dict) -> PruneResult:
    from .engine.checked import check_before_model
    from .engine.pipeline import run
    from .engine.survey import SurveyOnly
    from .inputs.hub import resolve_model
    cfg = RunConfig(shards=Path(model), out=Path(out), **options)
    check_before_model(cfg)  # before a Hub id's download
    folder = resolve_model(model, revision, cfg.progress, notify)
    report = run(dataclasses.replace(cfg, shards=folder), model_checked=True)
    if report is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return PruneResult(cfg.out)
    if isinstance(report, SurveyOnly):
        return PruneResult(cfg.out, costs=report.costs, previews=report.previews, input_blocks=report.input_blocks)
    return PruneResult.of_report(cfg.out, report)
