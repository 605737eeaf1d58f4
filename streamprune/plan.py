"""Predict before running: bytes on disk and in memory, the micro-batch that fits, and a time
estimate, from config.json and the safetensors headers alone (no weight is read).

The memory model follows what the pipeline holds at its peak, while block i is scored:
block i's weights in the compute dtype, its sliced copy, block i+1 being prefetched (stored
dtype), block i's sliced weights being written (stored dtype), and one micro-batch of
activations; plus the Python process itself (torch, transformers, tokenizer)."""

from __future__ import annotations

import dataclasses
import re
import time
from decimal import Decimal
from dataclasses import asdict, dataclass

import psutil
import torch

from .cache import chunk_rows
from .compensate import COMPENSATIONS
from .errors import StreamPruneError
from .model import check_device, open_model, output_shape
from .scoring import SCORERS, ScoringOptions, make_scorer
from .selection import Sizes
from .shards import ITEMSIZE
from .validate import check_sparsity

BASE_PROCESS_BYTES = 700 * 2**20  # measured 440-660 MiB for `streamprune run` on CPU, rounded up
CUDA_PROCESS_BYTES = 1700 * 2**20  # host RSS with the CUDA libraries loaded: 1.6 GiB measured (H200)
MAX_ACTIVATION_BYTES = 1 * 2**30  # larger micro-batches stop paying off on a CPU
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_bytes(text: str) -> int:
    """'24GiB', '512MB', '1.5g', '1000000' -> bytes (decimal arithmetic: no float overflow)."""
    m = SIZE.fullmatch(str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise StreamPruneError(f"cannot read {text!r} as a size (examples: 24GiB, 512MB)")
    return int(Decimal(m.group(1)) * UNITS[m.group(2).lower()])


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def activation_bytes(block, seq_len: int, batch: int, itemsize: int = 4, scores: bool = True) -> int:
    """Activations of one block forward on `batch` windows: residual, norms, q/k/v (k/v repeated
    to all heads), SwiGLU, dense and pruned outputs side by side, in the compute dtype (fp32 on
    a CPU); plus the attention scores where they are materialized (`scores`: the CPU; a GPU's
    fused attention kernels never hold them). On a GPU, compensation's fp32 copies of the
    down_proj inputs are about as large as the bf16 forward and are covered by it."""
    per_token = 10 * block.hidden + 4 * block.n_heads * block.head_dim + 3 * block.intermediate \
        + (block.n_heads * seq_len if scores else 0)
    return itemsize * batch * seq_len * per_token


@dataclass(frozen=True)
class Plan:
    device: str
    micro_batch: int
    block_stored_bytes: int  # largest block, as stored
    block_compute_bytes: int  # largest block, in the compute dtype
    cache_bytes: int  # on disk, two block boundaries live at once
    output_bytes: int
    peak_host_bytes: int
    peak_device_bytes: int  # 0 on CPU
    max_memory_bytes: int
    fits: bool
    estimated_seconds: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def block_bytes(index, names: dict[str, str]) -> int:
    return sum(index.tensors[n].nbytes for n in names.values())


def make_plan(model, sizes, samples: int, seq_len: int, device: str, sparsity: float,
              max_memory: int | None = None, batch_size: int = 0, work_bytes: int = 0) -> Plan:
    """work_bytes: what scoring or compensation holds beside the weights and a micro-batch."""
    dev = torch.device(device)
    arch, index = model.arch, model.index
    stored = max(block_bytes(index, arch.block_tensors(i)) for i in range(arch.n_layers))
    n_params = max(b.n_params() for b in arch.blocks)
    compute = n_params * 4 if dev.type == "cpu" else stored
    kept = 1 - sparsity
    others = sum(index.tensors[n].nbytes for n in arch.other_tensors())
    output = int(sum(block_bytes(index, arch.block_tensors(i)) for i in range(arch.n_layers)) * kept) + others
    cache = 2 * samples * seq_len * arch.hidden * 4
    limit = max_memory or available_memory(dev)
    emb_item = ITEMSIZE[index.tensors[arch.other_tensors()[0]].dtype]
    embed_rows = min(arch.vocab, samples * seq_len) * arch.hidden * emb_item

    itemsize = 4 if dev.type == "cpu" else max(1, round(stored / n_params))  # of the compute dtype

    def act_bytes(batch: int) -> int:
        return activation_bytes(arch.widest, seq_len, batch, itemsize, scores=dev.type == "cpu")

    def peaks(batch: int) -> tuple[int, int]:
        act = act_bytes(batch) + work_bytes
        weights = compute * (1 + kept)
        io = stored * (1 + kept)  # prefetch of the next block + the write buffer
        if dev.type == "cpu":
            return BASE_PROCESS_BYTES + max(weights + io + act, embed_rows), 0
        # a GPU micro-batch passes through host memory a chunk at a time (read and write)
        staging = 2 * 4 * seq_len * arch.hidden * min(batch, chunk_rows((batch, seq_len, arch.hidden)))
        return CUDA_PROCESS_BYTES + io + stored + max(embed_rows, staging), weights + act

    host_limit = limit if dev.type == "cpu" else psutil.virtual_memory().available

    def fits(batch: int) -> bool:
        host, device_bytes = peaks(batch)
        return host <= 0.9 * host_limit and device_bytes <= 0.9 * limit

    if batch_size:
        batch = min(batch_size, samples)
    else:
        batch = 1
        cap = MAX_ACTIVATION_BYTES if dev.type == "cpu" else limit
        while batch < samples and fits(batch + 1) and act_bytes(batch + 1) <= cap:
            batch += 1
    host, device_bytes = peaks(batch)
    return Plan(device=str(dev), micro_batch=batch, block_stored_bytes=stored, block_compute_bytes=compute,
                cache_bytes=cache, output_bytes=output, peak_host_bytes=host, peak_device_bytes=device_bytes,
                max_memory_bytes=limit, fits=fits(batch))


def measure_flops(device: torch.device, seconds: float = 0.3) -> float:
    """Sustained matmul FLOP/s of the device in its compute dtype (a short calibration)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(512, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * 512 * 2048 * 2048 * n / (time.perf_counter() - t0)


def measure_read_speed(index, limit: int = 256 * 2**20) -> float:
    """Bytes/s reading the largest input shard (at most `limit` bytes; the OS cache may flatter it)."""
    path = max({t.file for t in index.tensors.values()}, key=lambda p: p.stat().st_size)
    t0, n = time.perf_counter(), 0
    with open(path, "rb") as f:
        while n < limit:
            chunk = f.read(16 * 2**20)
            if not chunk:
                break
            n += len(chunk)
    return n / max(time.perf_counter() - t0, 1e-6)


def estimate_seconds(model, samples: int, seq_len: int, device: str, forward_passes: float) -> float:
    """Compute: 2 FLOPs per weight per token per block forward; I/O: every input byte read once,
    about two-thirds as much written back, the cache written and read once per block."""
    dev = torch.device(device)
    arch = model.arch
    flops = 2 * sum(b.n_params() for b in arch.blocks) * samples * seq_len * forward_passes
    io = sum(t.nbytes for t in model.index.tensors.values()) * 1.7 + 2 * arch.n_layers * samples * seq_len * arch.hidden * 4
    return flops / measure_flops(dev) + io / measure_read_speed(model.index)


def scoring_options(cfg, sizes=None) -> ScoringOptions:
    """What the run's scorer is told: the cut, the budget, and whether least squares will refit."""
    return ScoringOptions(sizes=sizes, budget=cfg.budget, refit=COMPENSATIONS[cfg.compensate].refits)


def stage_work_bytes(cfg, model, sizes) -> int:
    """Memory held by scoring or compensation (they run one after the other) for the widest block."""
    block = max(model.arch.blocks, key=lambda b: b.n_params())
    scorer = make_scorer(cfg.method, scoring_options(cfg, sizes))
    cut = dataclasses.replace(block, n_heads=sizes.n_heads, n_kv=sizes.n_kv, intermediate=sizes.intermediate)
    return max(scorer.work_bytes(block), COMPENSATIONS[cfg.compensate].work_bytes(block, cut))


def stage_forward_passes(cfg) -> float:
    """Block forwards per block over all calibration tokens: scoring, compensation (two passes,
    each dense and pruned attention), and passing outputs on (dense and pruned)."""
    scorer = make_scorer(cfg.method, scoring_options(cfg))
    compensation = COMPENSATIONS[cfg.compensate].forward_passes
    return scorer.forward_passes(cfg.samples * cfg.seq_len) + compensation + 2.0


def describe_plan(cfg, timing: bool = True) -> dict:
    """What `streamprune plan` prints: the memory plan plus, optionally, a time estimate. Refuses
    what `run` would refuse up front (device, method, sparsity) with the same checks."""
    check_device(cfg.device)
    if cfg.method not in SCORERS:
        raise StreamPruneError(f"unknown --method {cfg.method!r}; choose from {', '.join(SCORERS)}")
    model = open_model(cfg.shards)
    check_sparsity(model.arch, cfg.sparsity)
    widest = model.arch.widest  # an input cut per block: planned for its widest block, uncut
    sizes = (output_shape(model, cfg.sparsity).sizes[0] if model.arch.uniform
             else Sizes(widest.n_kv, widest.group, widest.intermediate))
    p = make_plan(model, sizes, cfg.samples, cfg.seq_len, cfg.device, cfg.sparsity, cfg.max_memory,
                  cfg.batch_size, stage_work_bytes(cfg, model, sizes))
    info = p.as_dict()
    if timing:
        passes = stage_forward_passes(cfg)
        info["estimated_seconds"] = round(estimate_seconds(model, cfg.samples, cfg.seq_len, cfg.device, passes), 1)
    return info
