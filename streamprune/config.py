"""The run's configuration: built once by the CLI, recorded in the journal and the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StreamPruneError

if TYPE_CHECKING:
    from .store.documents import TextSource


METHODS = ("perturb", "magnitude", "wanda-sp", "flap")  # scoring.SCORERS' names
COMPENSATIONS = ("lsq", "mean", "none")  # compensate.COMPENSATIONS' names
ALLOCATIONS = ("global", "uniform", "rule")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0")  # streamprune export --type
MAX_SEED = 2**32 - 1  # seeds derive as seed * 1_000_003 + layer, which must fit torch's 64-bit seed
MAX_COUNT = 2**31 - 1  # samples, tokens per window, micro-batch: what int32 indexing allows
MAX_BUDGET = 1000.0  # 64,000 perturbations per block: a thousand times the default work
MAX_MEMORY = 2**64  # 16 EiB
MAX_MULTIPLE = 2**16  # --multiple-of: more GPUs than any tensor-parallel group
# --row-multiple's default: llama.cpp's block of 32 weights (q8_0, q5_0, q4_0), so the default output quantizes whole
# (docs/performance.md section 7 measures what it costs); a model that cannot meet it is cut as with 1 (a log line)
DEFAULT_ROW_MULTIPLE = 32


def check_sparsity_range(sparsity: float, option: str = "--sparsity") -> None:
    if not 0 <= sparsity < 1:  # also refuses NaN
        hint = f" (a fraction: {option} {sparsity / 100:g} for {sparsity:g}%)" if 1 <= sparsity < 100 else ""
        raise StreamPruneError(f"{option} must be in [0, 1), got {sparsity}{hint}")


def parse_sparsities(text: str) -> tuple[float, ...]:
    """--preview's comma-separated sparsities ('0.2,0.4')."""
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise StreamPruneError(f"--preview must be sparsities separated by commas (e.g. 0.2,0.4), "
                               f"got {text!r}") from None


def check_multiple_of_range(multiple_of: int, option: str = "--multiple-of") -> None:
    if not 1 <= multiple_of <= MAX_MULTIPLE:
        raise StreamPruneError(f"{option} must be in [1, {MAX_MULTIPLE}], got {multiple_of}")


# What an option does to the output, and so to the fingerprint that guards resume (RunConfig.fingerprint):
BYTES = "bytes"  # it changes the output bytes: a run resumes only with the same value
BYTES_IF_SET = "bytes if set"  # the same, fingerprinted only when not the default: options added after
#                               journals were first written, so that an older run still resumes
NO_BYTES = "no bytes"  # it changes no output byte (where files go, memory, progress): a resumed run may differ

RUN, PLAN, INSPECT = "run", "plan", "inspect"  # the commands whose options come from this table
RUN_PLAN, EVERY_COMMAND = (RUN, PLAN), (RUN, PLAN, INSPECT)


@dataclass(frozen=True)
class Option:
    """How one RunConfig field is offered: its help, what it does to the output bytes (BYTES,
    BYTES_IF_SET, NO_BYTES) and to the survey (`survey`: the survey's records depend on it, so a
    survey is reused only by a run that has the same value), the commands that take it, and how a
    value is given when not as the default's type (`kind`: "file", "folder", "size", "device",
    "choice" with `choices`, "sparsities" for a comma-separated list, "internal" for what only the code
    sets). `flag` spells it on the
    command line when not --the-name (a flag whose default is True is spelled as its negation);
    `alias` is a second flag that sets one value: (flag, value, help)."""

    help: str
    output: str = BYTES
    survey: bool = True
    commands: tuple[str, ...] = (RUN,)
    kind: str = ""
    choices: tuple[str, ...] = ()
    flag: str = ""
    alias: tuple[str, str, str] | None = None
    show_default: bool | str = True


def option(default, help: str = "", **how):
    """A RunConfig field declared with how it is offered (Option): the one place an option is declared."""
    return field(default=default, metadata={"option": Option(help, **how)})


def options_of(command: str | None = None) -> list[tuple[dataclasses.Field, Option]]:
    """The run's options in declaration order (the fields that have a default), or those `command` takes."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(RunConfig)
            if "option" in f.metadata and (command is None or command in f.metadata["option"].commands)]


TEXT_FILE = "a plain text file, JSON lines (.jsonl, .json, .gz) or Parquet"


@dataclass(frozen=True)
class RunConfig:
    """A run's arguments. Each option is declared once, here, with its help and what it changes
    (option()): the command line's run, plan and inspect options, the Python API's keyword checks,
    the fingerprint that guards resume and what the survey depends on all come from these fields."""

    shards: Path = field(metadata={"role": BYTES})  # the input model folder (the CLI's --shards, with --revision)
    out: Path = field(metadata={"role": NO_BYTES})  # the output folder (the CLI's --out)
    sparsity: float = option(
        0.3, "Fraction of the decoder blocks' weights to remove, in [0, 1) (0.3 for 30%). Over all blocks together: "
        "under --allocation global some blocks lose much more, others less or nothing.",
        survey=False, commands=EVERY_COMMAND)
    calib: Path | None = option(None, f"Calibration text: {TEXT_FILE}. plan fits the windows to it as run does.",
                                commands=RUN_PLAN, kind="file")
    calib_dataset: str | None = option(  # NAME[:CONFIG][:SPLIT] of a `datasets` dataset, instead of --calib
        None, "Calibration from a `datasets` dataset: NAME[:CONFIG][:SPLIT] (instead of --calib).",
        output=BYTES_IF_SET, commands=RUN_PLAN, kind="text")
    text_field: str = option(  # the text of each row of a JSON lines / Parquet file or a dataset
        "text", "The text field of JSON lines / Parquet rows or a dataset's column.", output=BYTES_IF_SET,
        commands=RUN_PLAN)
    samples: int = option(128, "Calibration windows (unset: fewer when the text is short, with a warning).",
                          commands=RUN_PLAN, show_default="128, or what the text holds")
    seq_len: int = option(2048, "Tokens per calibration window (unset: shorter when the text is very short).",
                          commands=RUN_PLAN, show_default="2048, at most max_position_embeddings")
    device: str = option("cpu", "cpu or cuda (plan: cuda without a GPU here plans for the GPU --max-memory or --gpu "
                         "describes).", commands=RUN_PLAN, kind="device")
    seed: int = option(0, "Seed of every random draw (perturbations, token samples).")
    method: str = option("perturb", "Scoring method: perturb, magnitude, wanda-sp or flap.", survey=False,
                         commands=RUN_PLAN)
    budget: float = option(  # scales the perturbations and tokens of sampling methods
        1.0, "Scales perturbations and tokens per block (perturb's work).", survey=False, commands=RUN_PLAN)
    # how each block's shape is chosen: "global" (per block, from measured costs, under one budget),
    # "uniform" (one shape for all, from measured costs), "rule" (one shape by a fixed rule, no survey)
    allocation: str = option(
        "global", "How each block's shape is chosen: global (each block its own, from measured costs, whole blocks "
        "may go), uniform (one shape for all, from measured costs), rule (one shape by a fixed rule, no survey).",
        survey=False, commands=RUN_PLAN, kind="choice", choices=ALLOCATIONS)
    # after slicing: "lsq" refits o_proj and down_proj by least squares; "mean" puts the removed
    # units' mean output into their biases (FLAP's compensation); "none". True/False mean lsq/none.
    compensate: str = option(
        "lsq", "After slicing: lsq refits o_proj and down_proj by least squares; mean adds the removed units' mean "
        "output to their biases (FLAP; Llama, and Qwen3 attention); none.", commands=RUN_PLAN, kind="choice",
        choices=COMPENSATIONS, alias=("--no-compensate", "none", "Same as --compensate none."))
    # kept query heads, KV heads and neurons split evenly over this many GPUs (tensor parallelism,
    # selection.tensor_parallel_ok); 1 = no constraint
    multiple_of: int = option(
        1, "Keep query heads and neurons multiples of N, and KV heads a multiple or divisor of N, in every block, so "
        "N GPUs (tensor parallelism, e.g. vLLM) can split the output.", output=BYTES_IF_SET, survey=False,
        commands=EVERY_COMMAND)
    # kept neuron counts and query heads x head_dim multiples of this (row lengths a block-quantized
    # type splits: 32 for q8_0/q4_0, 256 for k-quants); 1 = no constraint
    row_multiple: int = option(
        DEFAULT_ROW_MULTIPLE, "Keep neuron counts and query heads x head_dim multiples of M in every block, so a "
        "quantized GGUF type splits every row (32: q8_0, q5_0, q4_0). 1: off. Left at the default, a model that "
        "cannot meet it is cut as with 1 (a log line says why).", output=BYTES_IF_SET, survey=False,
        commands=EVERY_COMMAND)
    calibrate_on: str = option(  # block i+1's calibration inputs: outputs of the pruned or the dense block i
        "pruned", "Calibrate block i+1 on the outputs of the pruned or the dense block i.", survey=False,
        kind="choice", choices=("pruned", "dense"))
    batch_size: int = option(  # calibration samples per micro-batch; 0 = pick from memory
        0, "Calibration windows per micro-batch (0: the largest that fits in memory).", output=NO_BYTES,
        commands=RUN_PLAN, show_default=False)
    max_memory: int | None = option(  # bytes the run may use (host on CPU, GPU on CUDA); None = what is free
        None, "Memory the run may use, e.g. 24GiB (host on CPU, GPU on CUDA; default: what is free, or plan --gpu's "
        "memory).", output=NO_BYTES, commands=RUN_PLAN, kind="size")
    cache_dir: Path | None = option(None, "Activation cache folder (default: inside --out).", output=NO_BYTES,
                                    commands=RUN_PLAN, kind="folder")
    keep_cache: bool = option(False, "Keep the activation cache after a finished run.", output=NO_BYTES)
    survey_only: bool = option(  # stop after the survey (runs with --survey-from prune from it)
        False, "Measure the costs (the survey) and show each block's shape at --sparsity and the --preview "
        "sparsities; prune nothing. Prune from it later with --survey-from (or a run into the same --out).",
        output=NO_BYTES)
    preview: tuple[float, ...] = option(  # the sparsities --survey-only shows besides --sparsity
        (0.2, 0.3, 0.4, 0.5), "With --survey-only: the other sparsities to show (comma-separated).", output=NO_BYTES,
        kind="sparsities", show_default="0.2,0.3,0.4,0.5")
    survey_from: Path | None = option(  # another output folder whose survey this run takes (journal.survey_from)
        None, "Prune from the survey of an earlier run (run --survey-only, or any run with --allocation global or "
        "uniform) in this folder instead of surveying again: any --sparsity, --allocation, --method, --budget, "
        "--multiple-of, --row-multiple, --calibrate-on; the same model, calibration and other options (a survey that "
        "differs is refused, naming how). The output is what a run from scratch writes.", output=NO_BYTES,
        kind="folder")
    restart: bool = option(False, "Discard any previous run in --out and start over.", output=NO_BYTES)
    progress: bool = option(True, "No progress bar.", output=NO_BYTES, flag="--quiet")
    overlap: bool = option(  # prefetch the next block and write shards in the background
        True, "Read and write blocks synchronously (no prefetch; for benchmarks).", output=NO_BYTES)
    profile: bool = option(  # synchronize the GPU at every phase boundary, for exact per-phase seconds
        False, "Exact seconds per phase in report.json on a GPU (synchronizes it at every phase; a little slower).",
        output=NO_BYTES)
    eval: Path | None = option(  # held-out text: perplexity before and after, in report.json
        None, f"Held-out text: measure perplexity before and after (streaming), into report.json; {TEXT_FILE}.",
        output=NO_BYTES, kind="file")
    eval_dataset: str | None = option(  # or held-out text from a `datasets` dataset
        None, "Held-out text from a `datasets` dataset: NAME[:CONFIG][:SPLIT] (instead of --eval).",
        output=NO_BYTES, kind="text")
    eval_seq_len: int = option(  # 0 = the default window: 2048, at most max_position_embeddings (as `eval`)
        0, "Tokens per evaluation window (0: 2048, at most max_position_embeddings; as `eval`).", output=NO_BYTES,
        show_default=False)
    # options left at their defaults ("samples", "seq_len"), which the run fits to the text and the
    # model (shorter text: fewer or shorter windows; seq_len at most max positions); the journal
    # and report record the values chosen
    adaptable: tuple[str, ...] = option((), output=NO_BYTES, commands=(), kind="internal")

    def __post_init__(self):
        check_sparsity_range(self.sparsity)
        for sparsity in self.preview:
            check_sparsity_range(sparsity, "--preview")
        if self.samples < 1 or self.seq_len < 2:
            raise StreamPruneError("--samples must be >= 1 and --seq-len >= 2")
        if max(self.samples, self.seq_len) > MAX_COUNT:
            raise StreamPruneError(f"--samples and --seq-len must be at most {MAX_COUNT}")
        if self.eval_seq_len != 0 and not 2 <= self.eval_seq_len <= MAX_COUNT:
            raise StreamPruneError(f"--eval-seq-len must be 0 (same as --seq-len) or in [2, {MAX_COUNT}], "
                                   f"got {self.eval_seq_len}")
        if not 0 < self.budget <= MAX_BUDGET:  # also refuses NaN
            raise StreamPruneError(f"--budget must be in (0, {MAX_BUDGET}], got {self.budget}")
        if not 0 <= self.seed <= MAX_SEED:
            raise StreamPruneError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.method not in METHODS:
            raise StreamPruneError(f"unknown --method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise StreamPruneError(f"--allocation must be one of {', '.join(ALLOCATIONS)}")
        check_multiple_of_range(self.multiple_of)
        check_multiple_of_range(self.row_multiple, "--row-multiple")
        if self.calibrate_on not in ("pruned", "dense"):
            raise StreamPruneError("--calibrate-on must be pruned or dense")
        if isinstance(self.compensate, bool):
            object.__setattr__(self, "compensate", "lsq" if self.compensate else "none")
        if self.compensate not in COMPENSATIONS:
            raise StreamPruneError(f"--compensate must be one of {', '.join(COMPENSATIONS)}")
        if not 0 <= self.batch_size <= MAX_COUNT:
            raise StreamPruneError(f"--batch-size must be in [0, {MAX_COUNT}] (0: from memory)")
        if self.max_memory is not None and not 1 <= self.max_memory <= MAX_MEMORY:
            raise StreamPruneError("--max-memory must be between 1 byte and 16 EiB")

    @property
    def previewed(self) -> tuple[float, ...]:
        """--survey-only's sparsities: --sparsity and the --preview list, each once, in order."""
        return tuple(sorted({self.sparsity, *self.preview}))

    @property
    def alignment(self):
        """What kept counts are multiples of (--multiple-of, --row-multiple): selection.Alignment."""
        from .pruning.selection import Alignment
        return Alignment(gpus=self.multiple_of, rows=self.row_multiple)

    @property
    def compensation(self):
        """The --compensate method: compensate.Compensation."""
        from .pruning.compensate import COMPENSATIONS as TABLE  # (this module's COMPENSATIONS: the names)
        return TABLE[self.compensate]

    def scorer(self, sizes=None):
        """The --method scorer for a block cut to `sizes`, told the budget and whether least squares
        will refit (scoring.Scorer)."""
        from .pruning.scoring import ScoringOptions, make_scorer
        return make_scorer(self.method, ScoringOptions(sizes=sizes, budget=self.budget,
                                                       refit=self.compensation.refits))

    def calib_source(self) -> TextSource:
        from .store.documents import TextSource  # (it imports torch: not when the CLI starts)
        return TextSource(file=self.calib, dataset=self.calib_dataset, field=self.text_field)

    def eval_source(self) -> TextSource | None:
        """The held-out text (--eval or --eval-dataset), or None without one."""
        if self.eval is None and self.eval_dataset is None:
            return None
        from .store.documents import TextSource
        return TextSource(file=self.eval, dataset=self.eval_dataset, field=self.text_field)

    def fingerprint(self) -> dict:
        """What must match for a re-run to resume into the same output folder: the options that change
        the output bytes (BYTES; BYTES_IF_SET when not the default), and the calibration text's hash."""
        fp = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in NOT_FINGERPRINTED or f.name in FINGERPRINTED_WHEN_SET and v == FORMER_DEFAULTS.get(
                    f.name, f.default):
                continue
            fp[f.name] = str(Path(v).resolve()) if isinstance(v, Path) else v
        if self.calib is not None or self.calib_dataset is not None:
            fp["calib_sha256"] = self.calib_source().sha256()  # also covers the field and the dataset
        return fp

    def as_dict(self) -> dict:
        return {f.name: (str(getattr(self, f.name)) if isinstance(getattr(self, f.name), Path)
                         else getattr(self, f.name)) for f in dataclasses.fields(self)}


def output_role(f: dataclasses.Field) -> str:
    return f.metadata["option"].output if "option" in f.metadata else f.metadata["role"]


# Derived from the table: the fields that do not change the output bytes (a resumed run may differ
# in them), those fingerprinted only when set, and what the survey does not depend on (a survey is
# reused by a run that differs from it only in these: journal.survey_carried, --survey-from).
NOT_FINGERPRINTED = tuple(f.name for f in dataclasses.fields(RunConfig) if output_role(f) == NO_BYTES)
FINGERPRINTED_WHEN_SET = tuple(f.name for f in dataclasses.fields(RunConfig) if output_role(f) == BYTES_IF_SET)
SURVEY_FREE = tuple(f.name for f, o in options_of() if o.output != NO_BYTES and not o.survey)
# BYTES_IF_SET options whose default changed: left out of the fingerprint at the value they had when journals
# were first written (a journal of --row-multiple 1 resumes; one of 1 never resumes into the default 32)
FORMER_DEFAULTS = {"row_multiple": 1}
