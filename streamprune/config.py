"""The run's configuration: built once by the CLI, recorded in the journal and the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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


def check_sparsity_range(sparsity: float) -> None:
    if not 0 <= sparsity < 1:  # also refuses NaN
        hint = f" (a fraction: --sparsity {sparsity / 100:g} for {sparsity:g}%)" if 1 <= sparsity < 100 else ""
        raise StreamPruneError(f"--sparsity must be in [0, 1), got {sparsity}{hint}")


def check_multiple_of_range(multiple_of: int, option: str = "--multiple-of") -> None:
    if not 1 <= multiple_of <= MAX_MULTIPLE:
        raise StreamPruneError(f"{option} must be in [1, {MAX_MULTIPLE}], got {multiple_of}")


@dataclass(frozen=True)
class RunConfig:
    shards: Path
    out: Path
    sparsity: float = 0.3
    calib: Path | None = None
    calib_dataset: str | None = None  # NAME[:CONFIG][:SPLIT] of a `datasets` dataset, instead of --calib
    text_field: str = "text"  # the text of each row of a JSON lines / Parquet file or a dataset
    samples: int = 128
    seq_len: int = 2048
    device: str = "cpu"
    seed: int = 0
    method: str = "perturb"
    budget: float = 1.0  # scales the perturbations and tokens of sampling methods
    # how each block's shape is chosen: "global" (per block, from measured costs, under one budget),
    # "uniform" (one shape for all, from measured costs), "rule" (one shape by a fixed rule, no survey)
    allocation: str = "global"
    # after slicing: "lsq" refits o_proj and down_proj by least squares; "mean" puts the removed
    # units' mean output into their biases (FLAP's compensation); "none". True/False mean lsq/none.
    compensate: str = "lsq"
    # kept query heads, KV heads and neurons split evenly over this many GPUs (tensor parallelism,
    # selection.tensor_parallel_ok); 1 = no constraint
    multiple_of: int = 1
    # kept neuron counts and query heads x head_dim multiples of this (row lengths a block-quantized
    # type splits: 32 for q8_0/q4_0, 256 for k-quants); 1 = no constraint
    row_multiple: int = 1
    calibrate_on: str = "pruned"  # block i+1's calibration inputs: outputs of the pruned or the dense block i
    batch_size: int = 0  # calibration samples per micro-batch; 0 = pick from memory
    max_memory: int | None = None  # bytes the run may use (host on CPU, GPU on CUDA); None = what is free
    cache_dir: Path | None = None
    keep_cache: bool = False
    survey_only: bool = False  # stop after the survey (a later run with another sparsity reuses it)
    restart: bool = False
    progress: bool = True
    overlap: bool = True  # prefetch the next block and write shards in the background
    profile: bool = False  # synchronize the GPU at every phase boundary, for exact per-phase seconds
    eval: Path | None = None  # held-out text: perplexity before and after, in report.json
    eval_dataset: str | None = None  # or held-out text from a `datasets` dataset, NAME[:CONFIG][:SPLIT]
    eval_seq_len: int = 0  # 0 = the default window: 2048, at most max_position_embeddings (as `eval`)
    # options left at their defaults ("samples", "seq_len"), which the run fits to the text and the
    # model (shorter text: fewer or shorter windows; seq_len at most max positions); the journal
    # and report record the values chosen
    adaptable: tuple[str, ...] = ()

    def __post_init__(self):
        check_sparsity_range(self.sparsity)
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

    # Fields that do not change the output bytes, so a resumed run may differ in them.
    NOT_FINGERPRINTED = ("out", "cache_dir", "keep_cache", "survey_only", "restart", "progress", "batch_size",
                         "max_memory", "overlap", "profile", "eval", "eval_dataset", "eval_seq_len", "adaptable")

    # What the survey does not depend on: a survey-only run (or one stopped before pruning) gives its
    # survey to a run that differs only in these (journal.survey_carried).
    SURVEY_FREE = ("sparsity", "allocation", "method", "budget", "multiple_of", "row_multiple", "calibrate_on")

    # Fingerprinted only when not the default, so a journal written before they existed still resumes.
    FINGERPRINTED_WHEN_SET = ("calib_dataset", "text_field", "multiple_of", "row_multiple")

    def fingerprint(self) -> dict:
        """What must match for a re-run to resume into the same output folder."""
        fp = {}
        for f in dataclasses.fields(self):
            if f.name in self.NOT_FINGERPRINTED:
                continue
            v = getattr(self, f.name)
            if f.name in self.FINGERPRINTED_WHEN_SET and v == f.default:
                continue
            fp[f.name] = str(Path(v).resolve()) if isinstance(v, Path) else v
        if self.calib is not None or self.calib_dataset is not None:
            fp["calib_sha256"] = self.calib_source().sha256()  # also covers the field and the dataset
        return fp

    def as_dict(self) -> dict:
        return {f.name: (str(getattr(self, f.name)) if isinstance(getattr(self, f.name), Path)
                         else getattr(self, f.name)) for f in dataclasses.fields(self)}
