"""Predict before running: bytes on disk and in memory and the micro-batch that fits, from
config.json and the safetensors headers alone (no weight is read). The time estimate is in
timing.py; what would make a run fit, and what `streamprune plan` prints, in advice.py.

The memory model follows what the pipeline holds at its peak, while block i is scored:
block i's weights in the compute dtype, its sliced copy, block i+1 being prefetched (stored
dtype), block i's sliced weights being written (stored dtype), one micro-batch of activations,
and scoring's or compensation's own work; plus the Python process itself (torch, transformers,
tokenizer). Each part is kept in the plan's breakdown."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import psutil
import torch

from ..pruning.costs import CURVE_STEPS, SAMPLE_SHARE, SAMPLE_TOKENS, held_out_survey
from ..pruning.numerics import ON_DEVICE, GramPlacement
from ..pruning.selection import Sizes
from ..pruning.sensitivity import probe_shape, stream_count
from ..pruning.shape import rule_shape
from ..store.cache import chunk_rows
from ..store.safetensors_header import ITEMSIZE
from .timing import block_flops, gram_flops

BASE_PROCESS_BYTES = 700 * 2**20  # measured 440-660 MiB for `streamprune run` on CPU, rounded up
CUDA_PROCESS_BYTES = 1700 * 2**20  # host RSS with the CUDA libraries loaded: 1.6 GiB measured (H200)
MAX_ACTIVATION_BYTES = 1 * 2**30  # larger micro-batches stop paying off on a CPU
HOST_GRAMS_DEVICE_BYTES = 1 * 2**30  # GPU memory of scoring and compensation with the Gram matrices on the host
RESIDENT_TENSORS = 3  # a block's inputs and dense outputs, the next block's inputs: kept on a GPU with room
GRAM_CHUNK_BYTES = 256 * 2**20  # GPU memory of one column block of a Gram matrix formed for the host


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
class Component:
    """One part of the predicted peak: its bytes, in which memory, and what it is."""

    name: str  # weights, prefetch_and_write, activations, scoring, compensation, embedding_rows, host_staging, process
    memory: str  # "host" or "GPU"
    bytes: int
    what: str


@dataclass(frozen=True)
class Plan:
    device: str
    micro_batch: int
    limited_by: str  # what stopped the micro-batch growing: samples, memory, activation cap, --batch-size
    block_stored_bytes: int  # largest block, as stored
    block_compute_bytes: int  # largest block, in the compute dtype
    cache_bytes: int  # on disk: four block boundaries live at once (make_plan)
    output_bytes: int
    peak_host_bytes: int
    peak_device_bytes: int  # 0 on CPU
    max_memory_bytes: int  # the limit of the compute device's memory (the host's on a CPU)
    host_limit_bytes: int | None  # host memory checked against on a GPU run; None: not checked (a described GPU)
    fits: bool
    breakdown: tuple[Component, ...] = ()  # at the chosen micro-batch
    activation_bytes_per_window: int = 0
    activation_cap_bytes: int | None = None  # on a CPU, larger micro-batches stop paying off
    grams_on: str = "device"  # where the large Gram matrices live and are factored (place_grams)
    gram_chunk_columns: int = 0
    resident_bytes: int = 0  # a block's inputs and dense outputs kept on the GPU between passes (0: re-read)
    keep_mlp_bytes: int = 0  # the last MLP pass's residual and activations kept for the output pass (0: not)

    @property
    def placement(self) -> GramPlacement:
        return GramPlacement(self.grams_on == "host", self.gram_chunk_columns)

    @property
    def short_of(self) -> str | None:
        """Which memory does not fit: "GPU", "host", or None."""
        host_limit = self.max_memory_bytes if not self.peak_device_bytes else self.host_limit_bytes
        return memory_short_of(self.peak_host_bytes, self.peak_device_bytes, host_limit, self.max_memory_bytes)

    def as_dict(self) -> dict:
        return asdict(self)


USABLE = 0.9  # of the memory limit, planned for; the rest is slack for what the model does not count


def memory_short_of(host: int, device_bytes: int, host_limit: int | None, device_limit: int) -> str | None:
    """Which memory a peak does not fit ("GPU", "host"; None: it fits), USABLE of each limit
    planned for; host_limit None: the host is not checked (a GPU on another machine)."""
    if device_bytes > USABLE * device_limit:
        return "GPU"
    return "host" if host_limit is not None and host > USABLE * host_limit else None


def block_bytes(index, names: dict[str, str]) -> int:
    return sum(index.tensors[n].nbytes for n in names.values())


def largest(lo: int, hi: int, ok) -> int | None:
    """The largest x in [lo, hi] with ok(x), for ok true up to some point and false after it."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def place_grams(device_type: str, fixed_bytes: int, work_bytes: int, limit: int, widest) -> GramPlacement:
    """Where OBS and the least-squares refits keep their Gram matrices: beside the block when the
    weights and one micro-batch (`fixed_bytes`) and the matrices (`work_bytes`) fit in USABLE of the
    GPU's limit; otherwise in host memory, formed on the GPU in column blocks of GRAM_CHUNK_BYTES
    (fp32 product and its fp64 copy) and factored on the host. On a CPU they are where the block is."""
    if device_type == "cpu" or fixed_bytes + work_bytes <= USABLE * limit:
        return ON_DEVICE
    return GramPlacement(host=True, columns=max(64, GRAM_CHUNK_BYTES // (12 * max(widest.intermediate, widest.hidden))))


def make_plan(model, sizes, samples: int, seq_len: int, device: str, sparsity: float,
              max_memory: int | None = None, batch_size: int = 0, scoring_bytes: int = 0,
              compensation_bytes: int = 0, host_memory: int | None = None, check_host: bool = True,
              probes: bool = False) -> Plan:
    """The peak memory of a run and the largest micro-batch that fits. max_memory: the compute
    device's limit (default: what is free); host_memory: the host's on a GPU run (default: what is
    free here; check_host=False: not checked, for a GPU on another machine). scoring_bytes and
    compensation_bytes: what those stages hold beside the weights and a micro-batch (one runs after
    the other: the larger counts)."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    arch, index = model.arch, model.index
    stored = max(block_bytes(index, arch.block_tensors(i)) for i in range(arch.n_layers))
    n_params = max(b.n_params() for b in arch.blocks)
    compute = n_params * 4 if not gpu else stored
    kept = 1 - sparsity
    others = sum(index.tensors[n].nbytes for n in arch.other_tensors())
    output = int(sum(block_bytes(index, arch.block_tensors(i)) for i in range(arch.n_layers)) * kept) + others
    limit = max_memory or available_memory(dev)
    host_limit = limit if not gpu else (host_memory or psutil.virtual_memory().available) if check_host else None
    emb_item = ITEMSIZE[index.tensors[arch.other_tensors()[0]].dtype]
    embed_rows = min(arch.vocab, samples * seq_len) * arch.hidden * emb_item
    itemsize = 4 if not gpu else max(1, round(stored / n_params))  # of the compute dtype
    # on disk (in the compute dtype, store/cache.py) while block i is scored: its inputs and dense
    # outputs, the inputs of block i+1 being written, and block i-1's inputs, kept until block i-1
    # is journaled (its shard written); with `probes` (a survey: process 0), two files of its
    # sensitivity probe streams
    windows, positions = probe_shape(samples, seq_len)
    streams = 2 * stream_count(arch.n_layers) * windows * positions if probes else 0
    cache = (4 * samples * seq_len + streams) * arch.hidden * itemsize
    where = "GPU" if gpu else "host"
    cap = MAX_ACTIVATION_BYTES if not gpu else limit

    def act_bytes(batch: int) -> int:
        return activation_bytes(arch.widest, seq_len, batch, itemsize, scores=not gpu)

    placement = place_grams(dev.type, int(compute * (1 + kept)) + act_bytes(1), max(scoring_bytes, compensation_bytes),
                            limit, arch.widest)
    on_host = max(scoring_bytes, compensation_bytes) if placement.host else 0
    if placement.host:  # what stays on the GPU: the scorer's own sample and passes, column blocks of the Grams
        scoring_bytes, compensation_bytes = (min(b, HOST_GRAMS_DEVICE_BYTES)
                                             for b in (scoring_bytes, compensation_bytes))

    def components(batch: int) -> tuple[Component, ...]:
        io = int(stored * (1 + kept))  # the prefetch of the next block + the write buffer
        parts = [
            Component("weights", where, int(compute * (1 + kept)),
                      f"the largest block in the compute dtype ({'fp32' if not gpu else 'as stored'}) "
                      "and its cut copy"),
            Component("prefetch_and_write", "host", io + stored if gpu else io,
                      "the next block read ahead and this block's shard being written, as stored"
                      + (", and the block on its way to the GPU" if gpu else "")),
            Component("activations", where, act_bytes(batch),
                      f"one micro-batch: {batch} window{'s' if batch > 1 else ''} of {seq_len} tokens"
                      + (", attention scores included" if not gpu else "")),
            Component("scoring", where, scoring_bytes, "the scoring method's own work (runs before compensation)"),
            Component("compensation", where, compensation_bytes, "the compensation's own work (after scoring)"),
            Component("embedding_rows", "host", embed_rows,
                      "the embedding rows of the calibration tokens (at the start, before any block)")]
        if placement.host:
            parts.append(Component("host_grams", "host", on_host, "the Gram matrices of OBS and least squares, "
                                   "kept and factored on the host (they do not fit beside the block on the GPU)"))
        if gpu:  # a micro-batch passes through host memory a chunk at a time (read and write)
            rows = min(batch, chunk_rows((batch, seq_len, arch.hidden)))
            parts.append(Component("host_staging", "host", 2 * 4 * seq_len * arch.hidden * rows,
                                   "micro-batch chunks between the activation cache and the GPU"))
        parts.append(Component("process", "host", CUDA_PROCESS_BYTES if gpu else BASE_PROCESS_BYTES,
                               "Python, torch" + (" with the CUDA libraries" if gpu else "")
                               + ", transformers, tokenizer"))
        return tuple(parts)

    def peaks(parts) -> tuple[int, int]:
        b = {c.name: c.bytes for c in parts}
        block = b["weights"] + b["activations"] + max(b["scoring"], b["compensation"])
        if gpu:
            return (b["process"] + b["prefetch_and_write"]
                    + max(b["embedding_rows"], b["host_staging"] + b.get("host_grams", 0)), block)
        return b["process"] + max(block + b["prefetch_and_write"], b["embedding_rows"]), 0

    def fits(batch: int) -> bool:
        return memory_short_of(*peaks(components(batch)), host_limit, limit) is None

    if batch_size:
        batch, limited_by = min(batch_size, samples), "--batch-size"
    else:
        batch = largest(1, samples, lambda b: b == 1 or (fits(b) and act_bytes(b) <= cap)) or 1
        limited_by = ("samples" if batch == samples else
                      "activation cap" if fits(batch + 1) and act_bytes(batch + 1) > cap else "memory")
    parts = components(batch)
    host, device_bytes = peaks(parts)

    def if_room(component: Component) -> int:
        """What the run keeps only where it fits beside the peak (on the compute device): its bytes, added
        to the breakdown and the peak, or 0."""
        nonlocal parts, host, device_bytes
        more = (host, device_bytes + component.bytes) if gpu else (host + component.bytes, device_bytes)
        if not component.bytes or memory_short_of(*more, host_limit, limit) is not None:
            return 0
        parts, (host, device_bytes) = parts + (component,), more
        return component.bytes

    # on a GPU: a block's inputs and dense outputs, and the next block's inputs as they are written, stay
    # on the GPU between its passes (engine/stream.BlockStream.resident)
    resident = if_room(Component(
        "resident", where, RESIDENT_TENSORS * samples * seq_len * arch.hidden * itemsize if gpu else 0,
        "the block's inputs and dense outputs and the next block's inputs, kept on the GPU between passes "
        "(read once, not once a pass)"))
    # the residual after attention and the MLP activations of the last pass over a block's MLP, every
    # calibration token, so its output pass runs only down_proj (pruning/scoring/base.KeptMlp)
    keep_mlp = if_room(Component(
        "kept_mlp", where, samples * seq_len * (arch.widest.intermediate + arch.hidden) * itemsize,
        "the residual and MLP activations of the block's last MLP pass, every calibration token (its output "
        "pass then runs only down_proj)"))
    return Plan(device=str(dev), micro_batch=batch, limited_by=limited_by, block_stored_bytes=stored,
                block_compute_bytes=compute, cache_bytes=cache, output_bytes=output, peak_host_bytes=host,
                peak_device_bytes=device_bytes, max_memory_bytes=limit, host_limit_bytes=host_limit,
                fits=fits(batch), breakdown=parts, activation_bytes_per_window=act_bytes(1),
                activation_cap_bytes=None if gpu else MAX_ACTIVATION_BYTES, resident_bytes=resident,
                keep_mlp_bytes=keep_mlp, **placement.as_dict())


def stage_bytes(cfg, model, sizes) -> tuple[int, int]:
    """Memory held by scoring and by compensation (one after the other) for the widest block.
    With sizes from the survey (--allocation global or uniform) a block may keep nearly all its
    neurons, the largest refit: counted at the uncut block."""
    block = max(model.arch.blocks, key=lambda b: b.n_params())
    scorer = cfg.scorer(sizes)
    cut = (dataclasses.replace(block, n_heads=sizes.n_heads, n_kv=sizes.n_kv, intermediate=sizes.intermediate)
           if cfg.allocation == "rule" else block)
    return scorer.work_bytes(block), cfg.compensation.work_bytes(block, cut)


def run_passes(cfg, model, heads_cut: bool = True, keep_mlp: bool = False) -> dict[str, float]:
    """The run's work in dense passes (one: every block's dense forward over all calibration
    tokens), by stage, counted in FLOPs at the widest block: the survey (--allocation global and
    uniform: the dense forward, its Gram matrices, the head layouts, the neuron curve), scoring,
    compensation and the output pass (the pruned block; the dense outputs are kept from the first
    pass that runs the dense block). Reported beside the measured `dense_passes` of a run.
    The allocation decides later which blocks lose heads: `heads_cut` counts every block as
    losing some (the most work), or none (the least). `keep_mlp`: the memory plan keeps the last MLP
    pass's activations (Plan.keep_mlp_bytes), and the output pass runs down_proj alone."""
    spec = max(model.arch.blocks, key=lambda b: b.n_params())
    T, N = cfg.seq_len, cfg.samples * cfg.seq_len
    E, I, HD = spec.hidden, spec.intermediate, spec.n_heads * spec.head_dim
    block = block_flops(spec, T)
    attention = block - 6 * E * I
    mlp_after_attention = 2 * E * HD + 6 * E * I  # o_proj and the MLP: a head layout or a head mask measured
    solves = I ** 3 / N  # a factorization and the greedy's updates, per calibration token, at the timed rate
    refit = cfg.compensation.refits
    parts = {}
    if cfg.allocation != "rule":
        layouts = (spec.n_kv * spec.group - 1) * min(SAMPLE_TOKENS, N) / N  # (all heads kept: not measured)
        held = held_out_survey(model.arch.blocks, N)  # the held-out ridges (with a refit) and the sensitivity probes
        parts["survey"] = 1 + (gram_flops(HD) + gram_flops(I) + layouts * mlp_after_attention
                               + (solves + (held_out_flops(spec, cfg) / N if held else 0) if refit else 0)) / block \
            + (probe_passes(model.arch.n_layers, cfg.samples, T) if held else 0)
    scorer = cfg.scorer()
    if cfg.method == "perturb" and refit and not heads_cut:  # one pass: the OBS Gram, the refit's equations
        parts["scoring"] = 1 + (gram_flops(I) + solves) / block
        parts["compensation"] = 0.0
    elif cfg.method == "perturb" and refit:  # (scoring/perturb.py) counted for a block that loses heads:
        # the token sample keeps the dense outputs and the heads' Gram (o_proj's refit), the OBS pass,
        # then compensation's pass for down_proj behind the refit o_proj, over the kept neurons
        masks, tokens = scorer.sample_sizes()
        sample = masks * min(tokens, N) / N
        kept = 1 - cfg.sparsity
        parts["scoring"] = 1 + (gram_flops(HD) + sample * mlp_after_attention + attention + 4 * E * I
                                + gram_flops(I) + solves) / block
        parts["compensation"] = (attention + kept * 4 * E * I + gram_flops(round(kept * I)) + kept * 2 * E * I) / block
    else:
        parts["scoring"] = scorer.forward_passes(N)
        parts["compensation"] = cfg.compensation.forward_passes
    kept_dense = refit  # the refit's pass kept the dense outputs
    if keep_mlp and refit:  # down_proj over the kept neurons, on the residual and activations kept
        parts["output"] = 2 * E * I * (1 - cfg.sparsity) / block
    else:
        parts["output"] = (1 - cfg.sparsity) + (0 if kept_dense else 1)
    return {k: round(v, 3) for k, v in parts.items()}


def probe_passes(n_layers: int, samples: int, seq_len: int) -> float:
    """The sensitivity probes' block forwards (sensitivity.py), in dense passes: block i runs 1 + 2 i
    streams and starts 2, L + 2 per block on average, of the probe tokens each."""
    windows, positions = probe_shape(samples, seq_len)
    return (n_layers + 2) * windows * positions / (samples * seq_len)


def held_out_flops(spec, cfg) -> float:
    """The survey's work on its held-out tokens, per block (costs.block_ridges, the neuron curve):
    at most five factorizations of half the neurons (numerics.held_out_refit) with their solves and
    the refit's target, and the curve's error at each of its points (half the neurons kept on average)."""
    I, E, T = spec.intermediate, spec.hidden, cfg.seq_len
    sample = min(SAMPLE_TOKENS, cfg.samples * max(1, T // SAMPLE_SHARE))
    return 5 * (I / 2) ** 3 / 3 + 10 * (I / 2) ** 2 * E + I * I * E + CURVE_STEPS * sample * I * E


def one_thread_passes(cfg, model) -> float:
    """What the I x I factorizations and greedy updates (the survey's neuron curve, perturb's OBS)
    add to run_passes' count, which has them at the timed rate of all threads, when they run on
    one thread, as they do on a CPU (numerics.reproducible): threads x I^3 FLOPs each. The time
    range's slow end counts it (Qwen2.5-Coder-1.5B at 8,192 tokens measured about 3.5 I^3 at the
    timed rate, docs/performance.md)."""
    if str(cfg.device).startswith("cuda") or not cfg.compensation.refits:
        return 0.0
    spec = max(model.arch.blocks, key=lambda b: b.n_params())
    # the survey's curve (and, held out, its ridges: five factorizations of I/2), the scorer's OBS
    held = held_out_survey(model.arch.blocks, cfg.samples * cfg.seq_len)
    stages = (cfg.allocation != "rule") * (1 + 5 / 24 * held) + (cfg.method == "perturb")
    return stages * torch.get_num_threads() * spec.intermediate ** 3 / (cfg.samples * cfg.seq_len) \
        / block_flops(spec, cfg.seq_len)


def planned_sizes(model, sparsity: float, multiple_of: int = 1) -> Sizes:
    """The cut planned for: the fixed rule's (blocks of one shape; `multiple_of` as --multiple-of),
    or an input already cut per block planned for its widest block, uncut."""
    if model.arch.uniform:
        return rule_shape(model, sparsity, multiple_of=multiple_of).sizes[0]
    widest = model.arch.widest
    return Sizes(widest.n_kv, widest.group, widest.intermediate)


def plan_run(cfg, model, max_memory: int | None = None, host_memory: int | None = None,
             check_host: bool = True) -> Plan:
    """make_plan for the run `cfg` describes; max_memory overrides cfg.max_memory."""
    sizes = planned_sizes(model, cfg.sparsity, cfg.alignment)
    scoring, compensation = stage_bytes(cfg, model, sizes)
    return make_plan(model, sizes, cfg.samples, cfg.seq_len, cfg.device, cfg.sparsity, max_memory or cfg.max_memory,
                     cfg.batch_size, scoring, compensation, host_memory, check_host,
                     probes=cfg.allocation != "rule" and held_out_survey(model.arch.blocks, cfg.samples * cfg.seq_len))
