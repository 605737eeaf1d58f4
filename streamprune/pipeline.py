"""The streaming loop: for each block, load it, score its units on the cached calibration
inputs, slice it, write it, pass its outputs on as the next block's inputs, journal it.
Only this module and the I/O modules touch files; the math lives in block/scoring/slicing."""

from __future__ import annotations

import logging
import resource
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .block import block_forward
from .cache import ActivationCache
from .calibration import bos_id, gather_embeddings, load_tokenizer, token_windows, tokenize_file
from .config import RunConfig
from .errors import StreamPruneError
from .evaluate import attach_eval, journaled_eval
from .families import EMBED, ModelSpec, bias_sublayers, model_spec, pruned_config, read_config, rotary_tables
from .compensate import compensate, restore_means
from .faults import fault_point
from .fsutil import atomic_write, atomic_write_json, remove_temporaries
from .journal import WORKDIR, Journal, refuse_foreign_folder
from .lock import LOCK_NAME, OutputLock
from .plan import Plan, make_plan, scoring_options, stage_work_bytes
from .scoring import Calibration, make_scorer
from .selection import Sizes, plan_sizes, select_units
from .shards import OutTensor, ShardIndex, read_header, shard_name, write_safetensors
from .slicing import add_zero_biases, slice_block
from .validate import (check_finite_activations, check_finite_weights, check_free_disk, check_paths,
                       check_sparsity, check_writable)

log = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "model.safetensors.index.json", "report.json")


@dataclass(frozen=True)
class Model:
    """Everything known about the input model before any weight is read."""

    folder: Path
    spec: ModelSpec
    index: ShardIndex


def open_model(folder: Path) -> Model:
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamPruneError(f"model folder not found: {folder}")
    spec = model_spec(read_config(folder))
    index = ShardIndex.open(folder)
    index.check(spec.expected_shapes())
    index.check_finite(spec.other_tensors())  # copied byte for byte into the output: check them here
    return Model(folder, spec, index)


def plan(model: Model, sparsity: float, compensate: str = "none") -> tuple[Sizes, dict]:
    """Uniform sizes for every block, and the output config.json (validated by transformers).
    With mean compensation, each sublayer that loses units gets a bias slot where the output
    family has one."""
    sizes = plan_sizes(model.spec.blocks[0], sparsity)
    biases = cut_sublayers(model, sizes) if compensate == "mean" else ()
    return sizes, pruned_config(model.spec.config, sizes.n_heads, sizes.n_kv, sizes.intermediate, biases)


def cut_sublayers(model: Model, sizes: Sizes) -> frozenset[str]:
    """"attention" if heads are removed, "mlp" if neurons are."""
    block = model.spec.blocks[0]
    return frozenset(s for s, cut in (("attention", sizes.n_heads < block.n_heads),
                                      ("mlp", sizes.intermediate < block.intermediate)) if cut)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_plan(cfg: RunConfig, model: Model, sizes: Sizes) -> Plan:
    """The micro-batch that fits in --max-memory (or what is free); refuses when none does."""
    p = make_plan(model, sizes, cfg.samples, cfg.seq_len, cfg.device, cfg.sparsity, cfg.max_memory,
                  cfg.batch_size, stage_work_bytes(cfg, model, sizes))
    if not p.fits:
        need = p.peak_device_bytes or p.peak_host_bytes
        raise StreamPruneError(
            f"this run needs about {need / 2**30:.1f} GiB of {'GPU' if p.peak_device_bytes else 'host'} memory "
            f"with micro-batch {p.micro_batch}, {p.max_memory_bytes / 2**30:.1f} GiB available; "
            "lower --seq-len or --batch-size, or raise --max-memory")
    return p


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StreamPruneError("--device cuda requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)")
    return dev


def compute_dtype(dev: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU; the model's own dtype on a GPU."""
    return torch.float32 if dev.type == "cpu" else model_dtype


def clear_output(out: Path) -> None:
    """Forget a previous run in `out` (the lock file, held by this run, stays)."""
    for p in (out / WORKDIR).glob("*"):
        if p.name != LOCK_NAME:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in list(out.glob("model-*.safetensors*")) + [out / n for n in MODEL_FILES]:
        p.unlink(missing_ok=True)


def write_block_inputs(cfg: RunConfig, model: Model, cache: ActivationCache, batch: int) -> None:
    """Block 0's inputs: the embeddings of the calibration windows, into the cache."""
    tokenizer = load_tokenizer(model.folder)
    tokens = token_windows(tokenize_file(tokenizer, cfg.calib), cfg.samples, cfg.seq_len, bos_id(tokenizer))
    rows, where = gather_embeddings(model.index, EMBED, tokens)
    check_finite_weights({"embed": rows}, {"embed": EMBED})
    writer = cache.writer(0)
    for start in range(0, cfg.samples, batch):
        writer.write(start, rows[where[start:start + batch]].float())
    writer.commit()


class BlockRunner:
    """Prunes one block at a time; holds only what every block shares. Reading block i+1 from the
    shards (prefetch) and writing block i's shard run on background threads while block i is
    scored; a block is journaled only once its shard is durable."""

    def __init__(self, cfg: RunConfig, model: Model, sizes: Sizes, cache: ActivationCache, batch: int,
                 biases: frozenset[str] = frozenset()):
        self.cfg, self.model, self.sizes, self.cache, self.batch = cfg, model, sizes, cache, batch
        self.biases = biases  # sublayers whose output projection has a bias in the output
        self.device = check_device(cfg.device)
        self.scorer = make_scorer(cfg.method, scoring_options(cfg, sizes))
        self.n_shards = model.spec.n_layers + 1
        self.cos, self.sin = rotary_tables(model.spec.config, cfg.seq_len, self.device)
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="streamprune-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="streamprune-write")

    def close(self) -> None:
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True)

    def prefetch(self, layer: int) -> Future:
        """Start reading block `layer` (stored dtype, host memory; pinned for a CUDA device)."""
        def read():
            t0 = time.time()
            names = self.model.spec.block_tensors(layer)
            W = self.model.index.load(names)
            check_finite_weights(W, names)
            # copy out of the memory map now, so the disk reads happen on this thread
            W = {k: t.pin_memory() if self.device.type == "cuda" else t.clone() for k, t in W.items()}
            return W, time.time() - t0
        return self.reader.submit(read)

    def batches(self, layer: int, dtype: torch.dtype):
        for start in range(0, self.cfg.samples, self.batch):
            stop = min(start + self.batch, self.cfg.samples)
            yield start, self.cache.batch(layer, start, stop, self.device, dtype)

    def prune(self, layer: int, stored: dict[str, torch.Tensor]) -> tuple[dict, Future]:
        """Score, slice and pass on block `layer`; returns its record and the future of its shard write."""
        t0 = time.time()
        spec = self.model.spec.blocks[layer]
        dtype = compute_dtype(self.device, stored["q"].dtype)
        W = {k: t.to(self.device, dtype, non_blocking=True) for k, t in stored.items()}
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + layer)
        calib = Calibration(lambda: (x for _, x in self.batches(layer, dtype)), self.cos, self.sin, generator,
                            self.cfg.samples)
        with torch.no_grad():
            scores = self.scorer.score(W, spec, calib)
            kept = select_units(scores.heads, scores.neurons, spec, self.sizes)
            W_new, spec_new = slice_block(W, spec, kept)
            if self.cfg.compensate == "lsq":
                W_new = compensate(W, spec, W_new, spec_new, kept, calib.batches, self.cos, self.sin)
            elif self.cfg.compensate == "mean":
                W_new = restore_means(W, spec, W_new, kept, calib.batches, self.cos, self.sin, self.biases)
            spec_new = spec_new.with_biases(self.biases)
            W_new = add_zero_biases(W_new, spec_new)
            t_score = time.time()
            out = [OutTensor.of(self.model.spec.layer_tensor(layer, s), t.to("cpu", stored.get(s, stored["o"]).dtype))
                   for s, t in W_new.items()]
            write = self.writer.submit(write_safetensors, self.model_path(layer + 1), out)
            rel_error = self.pass_outputs(layer, W, spec, W_new, spec_new, dtype)
        return {
            "layer": layer,
            "heads": [spec.n_heads, spec_new.n_heads], "kv_heads": [spec.n_kv, spec_new.n_kv],
            "neurons": [spec.intermediate, spec_new.intermediate],
            "params": [spec.n_params(), spec_new.n_params()],
            "kept_heads": kept.heads.tolist(), "kept_kv_heads": kept.kv.tolist(),
            "relative_error": rel_error, "scoring": scores.info,
            "timing": {"score_seconds": round(t_score - t0, 3), "forward_seconds": round(time.time() - t_score, 3)},
        }, write

    def pass_outputs(self, layer, W, spec, W_new, spec_new, dtype) -> float:
        """Run the pruned block on the calibration inputs; its outputs are the next block's
        inputs (so later blocks are calibrated on what they will really see), or the dense
        block's outputs with --calibrate-on dense. Returns the relative squared error of the
        pruned against the dense block output."""
        writer = self.cache.writer(layer + 1)
        err = ref = 0.0
        for start, x in self.batches(layer, dtype):
            y_dense = block_forward(W, spec, x, self.cos, self.sin)
            y = block_forward(W_new, spec_new, x, self.cos, self.sin)
            check_finite_activations(y, layer, start)
            err += (y - y_dense).double().pow(2).sum().item()
            ref += (y_dense - x).double().pow(2).sum().item()
            writer.write(start, y_dense if self.cfg.calibrate_on == "dense" else y)
        writer.commit()
        return err / max(ref, 1e-30)

    def model_path(self, k: int) -> Path:
        return self.cfg.out / shard_name(k, self.n_shards)

    def run_blocks(self, journal: Journal, start: int) -> None:
        """Blocks start..L-1 with prefetch and asynchronous writes. Block i is journaled (and its
        inputs dropped) after its shard is written, while block i+1 is already being scored."""
        L = self.model.spec.n_layers
        bar = tqdm(total=L, initial=start, unit="block", desc="pruning", disable=not self.cfg.progress,
                   dynamic_ncols=True)
        next_read, pending = None, None
        try:
            for layer in range(start, L):
                t0 = time.time()
                W, read_seconds = (next_read or self.prefetch(layer)).result()
                wait = time.time() - t0
                next_read = self.prefetch(layer + 1) if layer + 1 < L and self.cfg.overlap else None
                record, write = self.prune(layer, W)
                fault_point("after_scoring")
                del W
                if not self.cfg.overlap:
                    write.result()
                record["timing"].update(read_seconds=round(read_seconds, 3), read_wait_seconds=round(wait, 3))
                if pending is not None:
                    self.finish(journal, *pending)
                pending = (layer, record, write, time.time())
                bar.update(1)
            if pending is not None:
                self.finish(journal, *pending)
        finally:
            bar.close()

    def finish(self, journal: Journal, layer: int, record: dict, write: Future, t_done: float) -> None:
        t0 = time.time()
        write.result()
        fault_point("before_journal")
        record["timing"]["write_wait_seconds"] = round(time.time() - t0, 3)
        record["timing"]["seconds"] = round(sum(v for k, v in record["timing"].items() if k != "read_seconds"), 3)
        journal.finish_block(layer, record)
        self.cache.drop(layer)


def write_model_files(cfg: RunConfig, model: Model, out_config: dict, report: dict) -> None:
    """Everything but the block shards; the index, which makes the folder loadable, comes last."""
    n = model.spec.n_layers + 1
    rest = shard_name(n, n)
    write_safetensors(cfg.out / rest, [OutTensor.copy(name, model.index) for name in model.spec.other_tensors()])
    fault_point("final_files")
    for src in sorted(model.folder.iterdir()):
        if src.is_file() and not src.name.startswith(".") and src.name not in MODEL_FILES \
                and not src.name.endswith(".safetensors"):
            atomic_write(cfg.out / src.name, lambda f, src=src: shutil.copyfileobj(open(src, "rb"), f))
    fault_point("final_files")
    atomic_write_json(cfg.out / "config.json", out_config)
    fault_point("final_files")
    atomic_write_json(cfg.out / "report.json", report)
    fault_point("final_files")
    weight_map, total = {}, 0
    for k in range(1, n + 1):
        for name, info in read_header(cfg.out / shard_name(k, n)).items():
            weight_map[name] = shard_name(k, n)
            total += info.nbytes
    atomic_write_json(cfg.out / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def build_report(cfg: RunConfig, model: Model, sizes: Sizes, journal: Journal, out_config: dict,
                 seconds: float, batch: int) -> dict:
    blocks = [journal.record(i) for i in range(model.spec.n_layers)]
    before = sum(b["params"][0] for b in blocks)
    after = sum(b["params"][1] for b in blocks)
    return {
        "arguments": {k: v for k, v in cfg.as_dict().items() if k not in RunConfig.NOT_FINGERPRINTED},
        "model": {"model_type": model.spec.model_type, "layers": model.spec.n_layers,
                  "output_model_type": out_config["model_type"]},
        "plan": {"heads": sizes.n_heads, "kv_heads": sizes.n_kv, "neurons": sizes.intermediate,
                 "biases_added": sorted(bias_sublayers(out_config) - bias_sublayers(model.spec.config))},
        "blocks": [{k: v for k, v in b.items() if k != "timing"} for b in blocks],
        "block_params": {"before": before, "after": after, "removed_fraction": 1 - after / before},
        "timing": {"seconds": round(seconds, 3), "blocks_seconds": journal.state.get("blocks_seconds"),
                   "peak_rss_bytes": peak_rss_bytes(), "micro_batch": batch,
                   "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
                   "blocks": [b["timing"] for b in blocks]},
    }


def run(cfg: RunConfig) -> dict:
    """Prune cfg.shards into cfg.out; resumes from the journal. Returns the report."""
    t0 = time.time()
    model = open_model(cfg.shards)
    check_paths(model.folder, cfg.out, cfg.cache_dir)
    if cfg.calib is None:
        raise StreamPruneError("--calib FILE is required (plain text in the model's domain)")
    if not Path(cfg.calib).is_file():
        raise StreamPruneError(f"text file not found: {cfg.calib}")
    check_device(cfg.device)
    check_sparsity(model.spec.blocks[0], cfg.sparsity)
    sizes, out_config = plan(model, cfg.sparsity, cfg.compensate)
    uncompensated = cut_sublayers(model, sizes) - bias_sublayers(out_config)
    if cfg.compensate == "mean" and uncompensated:
        log.warning("--compensate mean: a %s output has no bias for %s, which stays uncompensated",
                    out_config["model_type"], " or ".join(sorted(uncompensated)))
    memory = memory_plan(cfg, model, sizes)
    if not cfg.restart:
        refuse_foreign_folder(cfg.out)
    check_writable(cfg.out)
    with OutputLock(cfg.out):
        return run_locked(cfg, model, sizes, out_config, memory, t0)


def run_locked(cfg: RunConfig, model: Model, sizes: Sizes, out_config: dict, memory: Plan, t0: float) -> dict:
    """The run proper, with the output folder locked against a second run."""
    if cfg.restart:
        clear_output(cfg.out)
    journal = Journal.open(cfg.out, cfg.fingerprint(), cfg.restart)
    # a resumed run keeps its micro-batch: float sums depend on it, and resume must be byte-identical
    batch = journal.state.setdefault("micro_batch", memory.micro_batch)
    journal.save()
    cache = ActivationCache(cfg.cache_dir or cfg.out / WORKDIR / "cache", cfg.samples, cfg.seq_len, model.spec.hidden)
    for folder in (cfg.out, cfg.out / WORKDIR, cache.folder):
        remove_temporaries(folder)
    if journal.complete and (cfg.out / "model.safetensors.index.json").is_file():
        log.info("%s is already complete", cfg.out)
        if not cfg.keep_cache:
            cache.remove()  # a run killed while deleting its cache
        return attach_eval(cfg, journal, build_report(cfg, model, sizes, journal, out_config, time.time() - t0, batch))
    check_free_disk(cfg.out, cache.folder, memory.output_bytes, memory.cache_bytes)
    if cfg.eval is not None:  # the input's perplexity, once (journaled), before any pruning
        journaled_eval(cfg, journal, "before", model.folder)

    L, start = model.spec.n_layers, journal.next_block
    if start < L and not cache.has(start):
        if start > 0:
            raise StreamPruneError(f"activation cache for block {start} is missing ({cache.path(start)}); "
                                   "re-run with --restart")
        write_block_inputs(cfg, model, cache, batch)
    if start < L:
        runner = BlockRunner(cfg, model, sizes, cache, batch, bias_sublayers(out_config))
        try:
            t_blocks = time.time()
            runner.run_blocks(journal, start)
            journal.state["blocks_seconds"] = round(time.time() - t_blocks, 3)
        finally:
            runner.close()
    report = build_report(cfg, model, sizes, journal, out_config, time.time() - t0, batch)
    write_model_files(cfg, model, out_config, report)
    report = attach_eval(cfg, journal, report)
    journal.finish()
    if not cfg.keep_cache:
        cache.remove()
    return report
