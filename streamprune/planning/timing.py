"""How long a run will take, before it starts: the work counted from the model's shapes, the
speed measured on this machine (short matmul calibrations, a read of the largest shard) or, for a
GPU that is not here, taken from its datasheet (a lower bound)."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import StreamPruneError

CALIBRATIONS, CALIBRATION_SECONDS = 3, 0.15  # matmul rounds (after a warm-up), each this long
READ_SECONDS, READ_LIMIT = 1.0, 256 * 2**20  # the shard read speed sample: at most this long, this much


@dataclass(frozen=True)
class Gpu:
    """Datasheet numbers of a known GPU (NVIDIA's published peaks, not measured here)."""

    name: str
    memory_bytes: int  # nominal capacity; the driver and CUDA context take a little of it
    tflops: float  # dense tensor-core peak, bf16 (T4: fp16, it has no bf16 tensor cores)
    bandwidth_gbs: float  # memory bandwidth, GB/s


GPUS = {g.name.lower().replace(" ", "-"): g for g in (
    Gpu("RTX 3090", 24 * 2**30, 71, 936), Gpu("RTX 4090", 24 * 2**30, 165, 1008),
    Gpu("L4", 24 * 2**30, 121, 300), Gpu("T4", 16 * 2**30, 65, 320),
    Gpu("A100 40GB", 40 * 2**30, 312, 1555), Gpu("A100 80GB", 80 * 2**30, 312, 2039),
    Gpu("H100", 80 * 2**30, 989, 3350), Gpu("H200", 141 * 2**30, 989, 4800))}


def find_gpu(name: str) -> Gpu:
    """'rtx4090', 'RTX 4090', 'a100-80gb', 'h100' -> its datasheet entry."""
    key = "".join(c for c in name.lower() if c.isalnum())
    found = [g for k, g in GPUS.items() if key and "".join(c for c in k if c.isalnum()).startswith(key)]
    if len(found) != 1:
        what = "is ambiguous" if found else "is not a GPU streamprune knows"
        raise StreamPruneError(f"--gpu {name!r} {what}; known: {', '.join(GPUS)} (or give --max-memory with "
                               "the GPU's memory)")
    return found[0]


def gpus_with(memory_bytes: int) -> list[str]:
    """The known GPUs with at least this much memory, smallest first."""
    return [g.name for g in sorted(GPUS.values(), key=lambda g: (g.memory_bytes, g.tflops))
            if g.memory_bytes >= memory_bytes]


def measure_flops(device: torch.device, rounds: int = CALIBRATIONS, seconds: float = CALIBRATION_SECONDS
                  ) -> list[float]:
    """Sustained matmul FLOP/s of the device in its compute dtype, once per round, after one
    warm-up matmul (thread pools and kernels start on the first)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(512, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    a @ b
    rates = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(2 * 512 * 2048 * 2048 * n / (time.perf_counter() - t0))
    return rates


TIMED_PARAMS = 16 * 2**20  # a block with more parameters is timed as a slice of it (timed_slice)
TIMED_SECONDS = 0.2  # about how long one timed forward takes, whatever the model and the device
MAX_TIMED_TOKENS = 65536


def timed_slice(spec):
    """What is timed of a block: the block itself, or where it has more than TIMED_PARAMS parameters
    a slice of it with its hidden size and head_dim, fewer KV groups (each with all its query heads)
    and fewer neurons: its matrix products keep the block's inner dimension, at a fraction of the
    work (a Llama-3-70B block: one KV group of 8 heads and 561 neurons, a 26th of its FLOPs)."""
    import dataclasses
    if spec.n_params() <= TIMED_PARAMS:
        return spec
    scale = TIMED_PARAMS / spec.n_params()
    kv = max(1, int(spec.n_kv * scale))
    return dataclasses.replace(spec, n_kv=kv, n_heads=kv * spec.group, sliding_window=None,
                               intermediate=max(64, int(spec.intermediate * scale)))


def timed_windows(spec, seq_len: int, batch_tokens: int, device: torch.device) -> tuple[int, int]:
    """(windows, tokens per window) of the timed micro-batch: the tokens of the run's micro-batch
    (`batch_tokens`: a small block runs several times faster on 8,192 tokens than on 512), but no
    more than this device computes in about TIMED_SECONDS (one short matmul says how fast it is), in
    windows of the run's length, or one shorter window where even one would take longer."""
    rate = max(measure_flops(device, rounds=1, seconds=0.05))
    tokens = int(min(batch_tokens, MAX_TIMED_TOKENS, max(64, TIMED_SECONDS * rate / block_flops(spec, seq_len))))
    window = min(seq_len, tokens)
    return max(1, tokens // window), window


def measure_block_rate(spec, seq_len: int, device: torch.device, rounds: int = CALIBRATIONS,
                       batch_tokens: int = 8192) -> list[float]:
    """FLOP/s of a dense block forward shaped like `spec` (random weights; a slice of a wide block,
    timed_slice) on a micro-batch like the run's (timed_windows): what a dense pass runs at,
    attention, norms and all, once per round, after a warm-up on one window (thread pools and
    kernels start on the first call)."""
    from ..pruning.block import block_forward
    spec = timed_slice(spec)
    windows, T = timed_windows(spec, seq_len, batch_tokens, device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    W = {k: (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(device, dtype)
         for k, shape in spec.shapes().items() if k in spec.tensor_names()}
    for k in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
        if k in W:
            W[k] = torch.ones_like(W[k])
    x = torch.randn(windows, T, spec.hidden, generator=g).to(device, dtype)
    cos = torch.ones(T, spec.head_dim, device=device)  # (any table costs the same)
    sin = torch.zeros(T, spec.head_dim, device=device)
    flops = block_flops(spec, T) * windows * T
    rates = []
    with torch.no_grad():
        block_forward(W, spec, x[:1], cos, sin)  # warm-up
        for _ in range(rounds):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            block_forward(W, spec, x, cos, sin)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates.append(flops / (time.perf_counter() - t0))
    return rates


def measure_read_speed(index) -> float:
    """Bytes/s reading the largest input shard from its start, for at most READ_SECONDS. Its
    pages are dropped from the OS cache first (where the OS allows), so a second plan measures
    the disk again and not memory."""
    path = max({t.file for t in index.tensors.values()}, key=lambda p: p.stat().st_size)
    n = 0
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        while n < READ_LIMIT and time.perf_counter() - t0 < READ_SECONDS:
            chunk = f.read(16 * 2**20)
            if not chunk:
                break
            n += len(chunk)
        elapsed = time.perf_counter() - t0
    return n / max(elapsed, 1e-6)


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float | None  # the estimate (None: not measured here)
    low_seconds: float | None  # the range over the calibrations (fastest to slowest)
    high_seconds: float | None
    at_least_seconds: float | None  # a described GPU: compute alone at its datasheet peak
    how: str
    flops: float  # the work counted
    io_bytes: float
    flops_per_second: tuple[float, ...] = ()
    read_bytes_per_second: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def block_flops(spec, seq_len: int) -> float:
    """FLOPs per token of one dense block forward: 2 per weight, and causal attention over windows
    of seq_len (scores and the weighted sum, half the square)."""
    return 2 * spec.n_params() + 2 * seq_len * spec.n_heads * spec.head_dim


def gram_flops(n: int) -> float:
    """FLOPs per token of a Gram matrix of n columns (numerics.add_gram: 5/8 of the square when wide)."""
    from ..pruning.numerics import SYMMETRIC_BLOCKS, SYMMETRIC_MIN
    k = SYMMETRIC_BLOCKS
    return 2 * n * n * ((k + 1) / (2 * k) if n >= SYMMETRIC_MIN else 1)


def run_parts(model, samples: int, seq_len: int) -> tuple[float, float, float]:
    """(FLOPs of one dense pass: every block's forward over all tokens, bytes of weights moved,
    bytes of activation cache moved): every input byte read once, about two-thirds as much written
    back; the cache written once and read about four times per block."""
    arch = model.arch
    per_pass = sum(block_flops(b, seq_len) for b in arch.blocks) * samples * seq_len
    weights = sum(t.nbytes for t in model.index.tensors.values()) * 1.7
    cache = 5 * arch.n_layers * samples * seq_len * arch.hidden * 4
    return per_pass, weights, cache


def run_work(model, samples: int, seq_len: int, forward_passes: float) -> tuple[float, float]:
    """(FLOPs, bytes moved) of a run of `forward_passes` dense passes (run_parts)."""
    per_pass, weights, cache = run_parts(model, samples, seq_len)
    return per_pass * forward_passes, weights + cache


NOT_COUNTED = "the least-squares solves, the regressions and Python overhead"
LOW, HIGH = 0.85, 1.5  # the range around the fastest and slowest timed rates: what the counted work leaves out


def estimate_time(model, samples: int, seq_len: int, device: torch.device, forward_passes: float,
                  gpu: Gpu | None = None, here: bool = True, fewest_passes: float | None = None,
                  batch: int = 1) -> TimeEstimate:
    """Measured on this machine (`here`), at the run's micro-batch of `batch` windows, or a datasheet
    lower bound for `gpu`, or nothing. The work is between `fewest_passes` (default: the same) and
    `forward_passes` dense passes; the estimate is the middle at the median speed, the range the
    fewest at the fastest and the most at the slowest, widened by LOW and HIGH."""
    fewest = forward_passes if fewest_passes is None else fewest_passes
    flops, io = run_work(model, samples, seq_len, forward_passes)
    if not here:
        if gpu is None:
            return TimeEstimate(None, None, None, None, "not measured here: no CUDA GPU on this machine "
                                "(--gpu NAME gives a lower bound from a known GPU's datasheet)", flops, io)
        return TimeEstimate(None, None, None, flops / (gpu.tflops * 1e12),
                            f"a lower bound: the counted work ({flops:.3g} FLOPs) at the {gpu.name}'s datasheet "
                            f"peak of {gpu.tflops:g} TFLOP/s; not counted: {NOT_COUNTED}, nor I/O", flops, io)
    rates = measure_block_rate(max(model.arch.blocks, key=lambda b: b.n_params()), seq_len, device,
                               batch_tokens=max(1, batch) * seq_len)
    read = measure_read_speed(model.index)
    per_pass = flops / forward_passes
    middle = statistics.median([per_pass * (fewest + forward_passes) / 2 / r + io / read for r in rates])
    low = per_pass * fewest / max(rates) + io / read
    high = flops / min(rates) + io / read
    passes = f"{forward_passes:.1f}" if fewest == forward_passes else f"{fewest:.1f} to {forward_passes:.1f}"
    how = (f"{passes} dense passes of {per_pass:.3g} FLOPs, at the {min(rates) / 1e9:.0f}-"
           f"{max(rates) / 1e9:.0f} GFLOP/s of {len(rates)} timed block forwards, {io / 2**30:.3g} GiB of I/O at the "
           f"{read / 1e6:.0f} MB/s read from the largest shard, under this machine's load now (other work changes "
           f"it); the range allows for {NOT_COUNTED}")
    return TimeEstimate(middle, low * LOW, high * HIGH, None, how, flops, io, tuple(rates), read)


def speedup(model, samples: int, seq_len: int, forward_passes: float, sample_passes: float, processes: int,
            flops_per_second: float, read_bytes_per_second: float = float("inf")) -> float:
    """Expected speed-up of `processes` data-parallel processes (torchrun) over one: the windows'
    forward passes and the activation cache divide among them; every process still reads every
    block's weights, and the passes over a fixed token sample (`sample_passes`, part of
    forward_passes: perturb's) are computed whole by each."""
    per_pass, weights, cache = run_parts(model, samples, seq_len)

    def seconds(n: int) -> float:
        compute = per_pass * ((forward_passes - sample_passes) / n + sample_passes)
        return compute / flops_per_second + (weights + cache / n) / read_bytes_per_second
    return seconds(1) / seconds(processes)


def duration(seconds: float) -> str:
    """45 s, 12 min, 6.3 h, 530 h (22.1 days)."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours:.0f} h ({hours / 24:.1f} days)"
