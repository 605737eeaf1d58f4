"""Checks that refuse a run before it writes anything: paths, sparsity, the kept-count multiples,
free disk (the texts: texts.py; NaN/Inf: store/finite.py)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..arch.spec import Architecture, BlockSpec
from ..config import RunConfig
from ..errors import StreamPruneError
from ..pruning.selection import Alignment, aligned, attention_params, head_layouts, neuron_step
from ..store.journal import WORKDIR
from ..units import size_text


def same_folder(a: Path, b: Path) -> bool:
    """True when a and b are the same folder, through symlinks too."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def inside(a: Path, b: Path) -> bool:
    """True when folder a is b or lies inside it (symlinks resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a.is_relative_to(b) or same_folder(a, b)


def check_paths(shards: Path, out: Path, cache_dir: Path | None) -> None:
    """The run never writes into its input: --out and --cache-dir lie outside the model folder,
    and the model folder is not inside --out (where a restart deletes files)."""
    if inside(out, shards):
        where = "is" if same_folder(out, shards) else "is inside"
        raise StreamPruneError(f"--out {out} {where} the input folder {shards}; choose an output folder outside it")
    if inside(shards, out):
        raise StreamPruneError(f"the input folder {shards} is inside --out {out}; choose an output folder outside it")
    if cache_dir is not None and inside(cache_dir, shards):
        where = "is" if same_folder(cache_dir, shards) else "is inside"
        raise StreamPruneError(f"--cache-dir {cache_dir} {where} the input folder {shards}; choose a folder outside it")


def check_folders(out: Path, cache_dir: Path | None, survey_from: Path | None) -> None:
    """--out and --cache-dir are folders (or new), --survey-from another run's folder."""
    check_folder_option(out, "--out")
    check_folder_option(cache_dir, "--cache-dir")
    if survey_from is not None:
        check_survey_folder(survey_from, out)


def check_folder_option(folder: Path | None, option: str) -> None:
    """--out and --cache-dir name folders (new or not): a file there is refused, saying so."""
    if folder is not None and (Path(folder).exists() or Path(folder).is_symlink()) and not Path(folder).is_dir():
        raise StreamPruneError(f"{option} {folder} is a file; {option} needs a folder (a new one, or one that "
                               f"{'holds an earlier streamprune output' if option == '--out' else 'exists'})")


def check_survey_folder(folder: Path, out: Path) -> None:
    """--survey-from names another run's output folder (its journal is checked when the run opens its own)."""
    if same_folder(folder, out):
        raise StreamPruneError(f"--survey-from {folder} is --out itself: a run reuses the survey in its own folder "
                               "without it; give another --out")
    if not (Path(folder) / WORKDIR / "journal.json").is_file():
        raise StreamPruneError(f"--survey-from {folder} holds no streamprune run (no {WORKDIR}/journal.json)")


def check_writable(folder: Path, option: str = "--out") -> None:
    """Create `folder` and its work folder if needed and prove a file can be written there (the
    probe goes in the work folder, so a run killed right here leaves nothing in `folder`)."""
    folder = Path(folder)
    probe = folder / WORKDIR / f"probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.parent.mkdir(exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StreamPruneError(f"cannot write to {option} {folder}: {e.strerror or e}") from None


def max_sparsity(block: BlockSpec, multiple_of: int = 1) -> float:
    """The most a block can lose while keeping one KV head, one query head and one neuron (with
    `multiple_of` > 1: its smallest layout and neuron count that many GPUs can split)."""
    full = attention_params(block, block.n_kv, block.group) + block.mlp_params()
    least = min(attention_params(block, kv, g) for kv, g in head_layouts(block, multiple_of))
    return 1 - (least + block.mlp_params(1 if aligned(multiple_of).free else neuron_step(block, multiple_of))) / full


def check_multiple_of(arch, multiple_of: int) -> None:
    """Every block can be cut to counts that `multiple_of` GPUs split (selection.tensor_parallel_ok)."""
    align = aligned(multiple_of)
    if align.free:
        return
    smaller = " or ".join(option for option, _ in align.given())
    for i, b in enumerate(arch.blocks):
        if not head_layouts(b, align):
            wants = [f"a multiple of {align.gpus} query heads and a multiple or divisor of {align.gpus} KV heads"
                     if align.gpus > 1 else "",
                     f"query heads x head_dim {b.head_dim} a multiple of {align.rows}" if align.rows > 1 else ""]
            raise StreamPruneError(
                f"{align.options()}: block {i} has {b.n_heads} query heads in {b.n_kv} KV groups; no cut keeps "
                f"{' with '.join(w for w in wants if w)} (use a smaller {smaller})")
        if neuron_step(b, align) > b.intermediate:
            raise StreamPruneError(f"{align.options()}: block {i} has only {b.intermediate} MLP neurons "
                                   f"(use a smaller {smaller})")


def check_sparsity(arch, sparsity: float, multiple_of: int = 1) -> None:
    """What this model can lose (the range [0, 1) itself is RunConfig's check): every block keeps a
    head and a neuron, in counts `multiple_of` GPUs can split."""
    check_multiple_of(arch, multiple_of)
    align = aligned(multiple_of)
    most = min(max_sparsity(b, align) for b in set(arch.blocks))
    if sparsity > most:
        kept = "every attention head of each block" if align.free else "more than each block's smallest aligned cut"
        raise StreamPruneError(f"--sparsity {sparsity} would remove {kept}; this model allows at most {most:.3f}"
                               + ("" if align.free else f" with {align.options()}"))


def row_multiple_unmet(arch, sparsity: float, gpus: int, rows: int) -> str | None:
    """Why this model cannot be cut with every row a multiple of `rows` (--row-multiple) at `sparsity`
    (with --multiple-of `gpus`), or None when it can. A model whose own row lengths are not multiples of
    `rows` gains nothing from it (its own matrices do not quantize whole)."""
    own = sorted({n for b in arch.blocks for n in (b.intermediate, b.n_heads * b.head_dim) if n % rows})
    if own:
        return (f"the model's own neuron counts or query heads x head_dim ({', '.join(map(str, own[:3]))}) are "
                f"not multiples of {rows}")
    try:
        check_sparsity(arch, sparsity, Alignment(gpus=gpus, rows=rows))
    except StreamPruneError as e:
        return str(e)
    return None


def fit_row_multiple(cfg: RunConfig, arch: Architecture) -> tuple[RunConfig, str | None, bool]:
    """(cfg, note, loss): --row-multiple left at its default (in cfg.adaptable) is kept where this model
    meets it, else the run cuts as with --row-multiple 1 and the note says why; `loss` is whether that
    costs the output anything (False where the model's own sizes do not quantize whole either). It
    never refuses a run."""
    if "row_multiple" not in cfg.adaptable or cfg.row_multiple == 1:
        return cfg, None, False
    why = row_multiple_unmet(arch, cfg.sparsity, cfg.multiple_of, cfg.row_multiple)
    if why is None:
        return cfg, None, False
    note = (f"--row-multiple 1, not the default {cfg.row_multiple} (neuron counts and query heads x head_dim that "
            f"quantized GGUF types split whole): {why}")
    return dataclasses.replace(cfg, row_multiple=1), note, not why.startswith("the model's own")


def existing_ancestor(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def folder_bytes(folder: Path, pattern: str) -> int:
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file()) if folder.is_dir() else 0


@dataclass(frozen=True)
class DiskNeed:
    """What a run will write on one filesystem, and what is free there."""

    folder: Path  # the nearest existing folder on that filesystem
    need_bytes: int
    free_bytes: int
    parts: tuple[str, ...]  # "output 1.2 GiB", "activation cache 3.4 GiB"

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.free_bytes


def disk_needs(out: Path, cache_folder: Path, output_bytes: int, cache_bytes: int,
               others: tuple[tuple[Path, int, str], ...] = ()) -> list[DiskNeed]:
    """The output plus the activation cache (plus `others`: (folder, bytes, what), such as a Hub
    model's download), per filesystem. What a previous, interrupted run already wrote is counted
    as written."""
    output_left = max(0, output_bytes - folder_bytes(out, "model-*.safetensors"))
    cache_left = max(0, cache_bytes - folder_bytes(cache_folder, "inputs-*[0-9]"))
    needs: dict[int, list] = {}  # filesystem -> [bytes, folder, what]
    for folder, n, what in ((out, output_left, "output"), (cache_folder, cache_left, "activation cache"), *others):
        where = existing_ancestor(folder)
        need = needs.setdefault(where.stat().st_dev, [0, where, []])
        need[0] += n
        need[2].append(f"{what} {size_text(n)}")
    return [DiskNeed(where, n, shutil.disk_usage(where).free, tuple(parts)) for n, where, parts in needs.values()]


def check_free_disk(out: Path, cache_folder: Path, output_bytes: int, cache_bytes: int) -> None:
    """Refuse up front when the output plus the activation cache will not fit (disk_needs)."""
    for d in disk_needs(out, cache_folder, output_bytes, cache_bytes):
        if not d.fits:
            raise StreamPruneError(f"not enough free disk in {d.folder}: this run needs about "
                                   f"{size_text(d.need_bytes)} "
                                   f"({', '.join(d.parts)}), {size_text(d.free_bytes)} free; free some space or use "
                                   "--cache-dir on another disk")


