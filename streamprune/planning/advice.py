"""Will it fit, and if not, what would: the whole prediction `streamprune plan` prints (memory
with its breakdown, disk, time, verdict) and the changes that make a run fit, each found by
planning the changed run again (plan.plan_run), never by guesswork. `run` refuses with the same
numbers in one line (refusal)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import psutil
import torch

from ..arch.model import open_model
from ..checks.validate import check_sparsity, disk_needs, fit_row_multiple
from ..config import COMPENSATIONS, METHODS
from ..device import parse_device
from ..errors import StreamPruneError
from ..inputs.calibration import run_window
from ..store.cache import run_cache_folder
from ..store.journal import WORKDIR
from ..units import parse_bytes, size_text
from .plan import USABLE, Plan, available_memory, largest, one_thread_passes, plan_run, run_passes
from .timing import GPUS, Gpu, TimeEstimate, estimate_time, find_gpu, gpus_with, run_work, speedup

ANY_GPU = 2**62  # the memory of a GPU of any size, to find what one needs
MAX_ALTERNATIVES = 3  # method / compensation changes listed
ROUND_TO = 64  # --seq-len and --samples suggested as multiples of this


@dataclass(frozen=True)
class Suggestion:
    """A change that makes the run fit, as typed on the command line, and the plan it gives."""

    change: str
    micro_batch: int
    peak_bytes: int  # of the memory that was short (GPU on a GPU run)
    note: str = ""


def size_option(n: int) -> str:
    """The smallest round --max-memory value of at least n bytes: 900MiB, 24.1GiB."""
    if n < 2**30:
        return f"{-(-n // 2**20)}MiB"
    tenths = -(-n * 10 // 2**30)
    return f"{tenths // 10}.{tenths % 10}GiB"


def needed_limit(p: Plan) -> int:
    """The limit under which plan p's peak (of the memory its limit is for) fits, without what a plan
    keeps only where there is room (resident activations, the kept MLP activations)."""
    return int(((p.peak_device_bytes or p.peak_host_bytes) - p.resident_bytes - p.keep_mlp_bytes) / USABLE) + 1


def suggestions(cfg, model, p: Plan, disk_ok=None, check_host: bool = True, offer_gpu: bool = True
                ) -> list[Suggestion]:
    """Changes to cfg under which the run fits (memory, and disk where disk_ok(plan) says so),
    each checked by planning the changed run with the same limits; for a CPU run, also the GPU
    it would need (`offer_gpu`)."""
    disk_ok = disk_ok or (lambda q: True)

    def replan(limit: int | None = None, **changes) -> Plan:
        return plan_run(dataclasses.replace(cfg, **changes), model, limit or p.max_memory_bytes, p.host_limit_bytes,
                        check_host)

    def ok(q: Plan) -> bool:
        return q.fits and disk_ok(q)

    def found(change: str, q: Plan, note: str = "") -> Suggestion:
        return Suggestion(change, q.micro_batch, q.peak_device_bytes or q.peak_host_bytes, note)

    out = []
    if cfg.batch_size and ok(q := replan(batch_size=0)):
        out.append(found("--batch-size 0", q, f"picks micro-batch {q.micro_batch}"))
    if p.short_of == ("GPU" if p.peak_device_bytes else "host"):
        out += limit_suggestions(cfg, p, replan, ok, found)
    if p.short_of == "host" and p.peak_device_bytes:
        need = int(p.peak_host_bytes / USABLE) + 1
        out.append(Suggestion(f"a machine with {size_text(need)} of free host memory", p.micro_batch, p.peak_host_bytes,
                              f"this one has {size_text(p.host_limit_bytes)} free"))
    for option, current, least in (("seq_len", cfg.seq_len, 2), ("samples", cfg.samples, 1)):
        n = largest(least, current - 1, lambda v: ok(replan(**{option: v})))
        if n is not None:  # a round number below the largest that fits (which is said)
            rounded = n - n % ROUND_TO if n >= 2 * ROUND_TO else n
            out.append(found(f"--{option.replace('_', '-')} {rounded}", replan(**{option: rounded}),
                             f"at most {n} fits"))
    alternatives = [((m != cfg.method) + (c != cfg.compensate), m, c) for m in METHODS for c in COMPENSATIONS
                    if (m, c) != (cfg.method, cfg.compensate)]
    fitting = [(k, m, c, q) for k, m, c in sorted(alternatives) if ok(q := replan(method=m, compensate=c))]
    for k, m, c, q in [f for f in fitting if f[0] == min(f[0] for f in fitting)][:MAX_ALTERNATIVES]:
        change = " ".join(x for x in (m != cfg.method and f"--method {m}", c != cfg.compensate and f"--compensate {c}")
                          if x)
        out.append(found(change, q))
    if offer_gpu and parse_device(cfg.device).type == "cpu" and p.short_of:
        out += [s for s, q in gpu_suggestion(cfg, model) if disk_ok(q)]
    return out


def limit_suggestions(cfg, p: Plan, replan, ok, found) -> list[Suggestion]:
    """The smallest --max-memory under which the run fits at micro-batch 1 (or --batch-size)."""
    text, q = smallest_limit(lambda limit, batch: replan(limit=limit, batch_size=batch), cfg.batch_size)
    if not ok(q):  # the host is short too (a GPU run), or the disk: no --max-memory alone helps
        return []
    if p.peak_device_bytes:
        note = gpu_note(parse_bytes(text))
    else:
        memory = psutil.virtual_memory()
        note = (f"this machine has {size_text(memory.total)}, {size_text(memory.available)} free now"
                + ("; it may swap or be killed" if parse_bytes(text) > memory.total else ""))
    return [found(f"--max-memory {text}", q, note)]


def gpu_suggestion(cfg, model) -> list[tuple[Suggestion, Plan]]:
    """A CPU run that does not fit: the GPU memory the same run needs on CUDA (micro-batch 1)."""
    gpu_cfg = dataclasses.replace(cfg, device="cuda", max_memory=None)
    text, q = smallest_limit(lambda limit, batch: plan_run(dataclasses.replace(gpu_cfg, batch_size=batch), model, limit,
                                                            check_host=False), cfg.batch_size)
    if not q.fits:
        return []
    return [(Suggestion(f"--device cuda --max-memory {text}", q.micro_batch, q.peak_device_bytes,
                        f"{gpu_note(parse_bytes(text))}, and {size_text(q.peak_host_bytes)} of host memory"), q)]


def smallest_limit(plan_at, batch_size: int) -> tuple[str, Plan]:
    """The smallest --max-memory (as written) under which `plan_at(limit, batch_size)` fits at
    micro-batch 1 (or `batch_size`), and the plan under that limit."""
    text = size_option(needed_limit(plan_at(ANY_GPU, batch_size or 1)))
    return text, plan_at(parse_bytes(text), batch_size)


def gpu_note(memory_bytes: int) -> str:
    names = gpus_with(memory_bytes)
    return (f"a GPU with at least {size_text(memory_bytes)}, e.g. {', '.join(names[:3])}" if names
            else f"a GPU with at least {size_text(memory_bytes)}, more than any known one has")


def refusal(cfg, model, p: Plan) -> str:
    """`run`'s one-line refusal: what is short, the breakdown, and what would fit."""
    which = p.short_of or "host"
    need = p.peak_device_bytes if which == "GPU" else p.peak_host_bytes
    have = p.max_memory_bytes if which == "GPU" or not p.peak_device_bytes else p.host_limit_bytes
    parts = ", ".join(f"{c.name.replace('_', ' ')} {size_text(c.bytes)}"
                      for c in p.breakdown if c.memory == which and c.bytes)
    fixes = [s.change for s in suggestions(cfg, model, p, offer_gpu=torch.cuda.is_available())]  # what runs here
    return (f"this run needs about {size_text(need)} of {which} memory with micro-batch {p.micro_batch} ({parts}), "
            f"{size_text(have)} available ({USABLE:.0%} of it planned for); "
            + (f"it would fit with {', '.join(fixes[:-1])}{' or ' if len(fixes) > 1 else ''}{fixes[-1]}" if fixes
               else "no single change of its options makes it fit")
            + " (`streamprune plan` shows the whole prediction)")


def physical_memory(device: torch.device, gpu: Gpu | None = None) -> tuple[int, str] | None:
    """Total memory of what --max-memory limits: (bytes, what it is); None for a GPU not here."""
    if gpu is not None:
        return gpu.memory_bytes, f"{gpu.name} GPU memory (datasheet)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(device).total_memory, "GPU memory on this machine"
    return psutil.virtual_memory().total, "memory on this machine"


def memory_warning(max_memory: int | None, device: str, gpu: Gpu | None = None) -> str | None:
    """A --max-memory above what the device has is allowed (the plan still has to fit), but said."""
    total = physical_memory(parse_device(device), gpu) if max_memory is not None else None
    if total is None or max_memory <= total[0]:
        return None
    risk = "run out of GPU memory" if parse_device(device).type == "cuda" else "swap or be killed"
    return (f"--max-memory {size_text(max_memory)} is more than the {size_text(total[0])} of {total[1]}; "
            f"the run may {risk}")


NOT_DOWNLOADED = ("not measured: the weights are not downloaded (read from the Hub's safetensors headers); plan again "
                  "once they are in the cache")


def describe_plan(cfg, timing: bool = True, gpu_name: str | None = None, remote_model=None, processes: int = 1) -> dict:
    """What `streamprune plan` prints, as a dict: the memory plan with its breakdown, the disk,
    the time, the verdict and, when it does not fit, the changes that would make it fit. Plans
    for a GPU that is not here when it is described (--max-memory or --gpu NAME). Refuses what
    `run` would refuse up front (method, sparsity) with the same checks. `remote_model`: a Hub
    model known from its headers (hub.remote_model): its download is counted on disk, and no
    time is measured here (that reads a shard). With `processes` > 1 (a torchrun job): memory
    and disk of one process, which holds its share of the windows, and the expected speed-up
    over one process."""
    if not 1 <= processes <= cfg.samples:
        raise StreamPruneError(f"--nproc must be between 1 and --samples ({cfg.samples}), got {processes}")
    whole = cfg
    cfg = dataclasses.replace(cfg, samples=-(-cfg.samples // processes))  # the windows of the busiest process
    dev = parse_device(cfg.device)
    gpu = find_gpu(gpu_name) if gpu_name else None
    if gpu is not None and dev.type != "cuda":
        raise StreamPruneError(f"--gpu {gpu_name} describes a CUDA GPU; use it with --device cuda")
    here = gpu is None and (dev.type == "cpu" or torch.cuda.is_available())
    if not here and gpu is None and cfg.max_memory is None:
        raise StreamPruneError("no CUDA GPU on this machine: describe the one to plan for with --max-memory "
                               f"(its memory, e.g. 24GiB) or --gpu NAME ({', '.join(GPUS)})")
    model = remote_model or open_model(cfg.shards)
    cfg, rows_note, rows_lost = fit_row_multiple(cfg, model.arch)
    rows_note = rows_note if rows_lost else None  # (as run: said only where the output loses something by it)
    whole = dataclasses.replace(whole, row_multiple=cfg.row_multiple)
    check_sparsity(model.arch, cfg.sparsity, cfg.alignment)
    fitted = None
    if cfg.calib is not None or cfg.calib_dataset is not None:  # the windows the run will use
        if remote_model is not None:
            fitted = "windows not fitted to --calib: the tokenizer is not downloaded (planned as given)"
        else:
            from ..checks.texts import check_text_sources, fitted_windows
            check_text_sources(whole)
            whole, _, _, fitted = fitted_windows(whole, model)
            cfg = dataclasses.replace(cfg, samples=-(-whole.samples // processes), seq_len=whole.seq_len)
    window = run_window(model.arch.config, cfg.seq_len, cfg.adaptable)
    capped = (f"--seq-len {window}, not {cfg.seq_len}: max_position_embeddings is {window} (as run uses)"
              if window < cfg.seq_len else None)
    cfg, whole = (dataclasses.replace(c, seq_len=window) for c in (cfg, whole))
    download = (((model.folder, sum(t.nbytes for t in model.index.tensors.values()), "download into the Hub cache"),)
                if remote_model is not None else ())
    limit = cfg.max_memory or (gpu.memory_bytes if gpu else available_memory(dev))
    p = plan_run(cfg, model, limit, check_host=here)
    cache_folder = run_cache_folder(cfg.out, cfg.out / WORKDIR, cfg.cache_dir)

    def disk_ok(q: Plan) -> bool:
        return all(d.fits for d in disk_needs(cfg.out, cache_folder, q.output_bytes, q.cache_bytes, download))

    disk = disk_needs(cfg.out, cache_folder, p.output_bytes, p.cache_bytes, download)
    fits = p.fits and all(d.fits for d in disk)
    advice = [] if fits else suggestions(cfg, model, p, disk_ok, here) + (disk_suggestions(disk, p) if p.fits else [])
    warning = memory_warning(cfg.max_memory, cfg.device, gpu)
    keep = p.keep_mlp_bytes > 0
    passes, fewest = run_passes(whole, model, keep_mlp=keep), run_passes(whole, model, heads_cut=False, keep_mlp=keep)
    most = sum(passes.values())
    if not timing:
        estimate = None
    elif remote_model is not None and here:
        estimate = TimeEstimate(None, None, None, None, NOT_DOWNLOADED,
                                *run_work(model, whole.samples, cfg.seq_len, most))
    else:  # the range: the fewest passes at the fastest rate, to the most with one-thread factorizations at the slowest
        estimate = estimate_time(model, whole.samples, cfg.seq_len, dev, most + one_thread_passes(whole, model), gpu,
                                 here, sum(fewest.values()), p.micro_batch)
    parallel = {}
    if processes > 1:
        parallel = dict(processes=processes, windows_per_process=cfg.samples)
        rates = sorted(estimate.flops_per_second) if estimate else []
        rate = rates[len(rates) // 2] if rates else gpu.tflops * 1e12 if gpu else None
        if rate:
            sample = whole.scorer().sample_passes(whole.samples * whole.seq_len)
            read = (estimate.read_bytes_per_second if estimate else None) or float("inf")
            parallel["expected_speedup"] = round(speedup(model, whole.samples, whole.seq_len, most,
                                                         sample, processes, rate, read), 2)
    return dict(
        p.as_dict(), fits=fits, memory_fits=p.fits, disk_fits=all(d.fits for d in disk),
        verdict="fits" if fits else "does not fit", short_of=p.short_of,
        device_here=here, gpu=asdict(gpu) if gpu else None,
        limit_from="--max-memory" if cfg.max_memory else "the GPU's datasheet memory" if gpu else "free now",
        usable_fraction=USABLE,
        samples=whole.samples, seq_len=cfg.seq_len, out=str(cfg.out), cache_folder=str(cache_folder),
        disk=[dict(folder=str(d.folder), need_bytes=d.need_bytes, free_bytes=d.free_bytes, parts=list(d.parts),
                   fits=d.fits) for d in disk],
        suggestions=[asdict(s) for s in advice], warnings=[w for w in (rows_note, fitted, capped, warning) if w],
        time=estimate.as_dict() if estimate else None, passes=passes, passes_without_head_cuts=fewest,
        estimated_seconds=round(estimate.seconds, 1) if estimate and estimate.seconds is not None else None,
        **parallel)


def disk_suggestions(disk, p: Plan) -> list[Suggestion]:
    """Where the disk is short (and the memory fits): how much to free there, or the cache on
    another disk when the output alone fits where it goes."""
    out = []
    for d in disk:
        if d.fits:
            continue
        out.append(Suggestion(f"free {size_text(d.need_bytes - d.free_bytes)} in {d.folder}", p.micro_batch, 0,
                              f"needs {size_text(d.need_bytes)} ({', '.join(d.parts)}), "
                              f"{size_text(d.free_bytes)} free"))
        if any(part.startswith("activation cache") for part in d.parts) and (
                len(d.parts) == 1 or p.output_bytes <= d.free_bytes):
            out.append(Suggestion(f"--cache-dir on a disk with {size_text(p.cache_bytes)} free", p.micro_batch, 0))
    return out
