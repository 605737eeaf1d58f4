"""The pruning pass: for each block, load it (read ahead on a thread), score its units on the
cached calibration inputs, slice and compensate it, write its shard (on a thread), pass its
outputs on as the next block's inputs, journal it. The survey pass is survey.py; the run's
steps around both are pipeline.py."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from ..arch.families import bias_sublayers
from ..pruning.block import block_forward
from ..pruning.phases import PhaseTimer, phase, timed_batches
from ..pruning.scoring.base import KeptMlp, TargetKeeper, Targets
from ..pruning.selection import select_units
from ..pruning.shape import Shape
from ..pruning.slicing import add_zero_biases, slice_block
from ..store.faults import fault_point
from ..store.finite import check_finite_activations
from ..store.journal import Journal
from ..store.records import BlockRecord
from ..store.runlog import FILE_ONLY
from ..store.shard_writer import OutTensor, shard_name, write_safetensors
from .context import RunContext
from .stream import BlockStream, progress_bar

log = logging.getLogger(__name__)


class BlockRunner:
    """Prunes one block at a time; holds only what every block shares. Reading block i+1 from the
    shards (prefetch) and writing block i's shard run on background threads while block i is
    scored; a block is journaled only once its shard is durable."""

    def __init__(self, ctx: RunContext, shape: Shape):
        self.ctx, self.cfg, self.model, self.shape, self.cache = ctx, ctx.cfg, ctx.model, shape, ctx.cache
        self.ranks, self.device, self.stream = ctx.ranks, ctx.device, ctx.stream()
        self.biases = bias_sublayers(shape.config)  # sublayers whose output projection has a bias in the output
        self.n_shards = self.model.arch.n_layers + 1
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="streamprune-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="streamprune-write")

    def close(self) -> None:
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True)

    def prefetch(self, layer: int) -> Future:
        """Start reading block `layer` (stored dtype, host memory; pinned for a CUDA device)."""
        def read():
            t0 = time.time()
            W = self.stream.read(layer)
            # copy out of the memory map now, so the disk reads happen on this thread
            W = {k: t.pin_memory() if self.device.type == "cuda" else t.clone() for k, t in W.items()}
            return W, time.time() - t0
        return self.reader.submit(read)

    def write_shard(self, layer: int, tensors: list) -> Future:
        """Write block `layer`'s shard on the writer thread (rank 0 only: the others' is done at once)."""
        if self.ranks.is_writer:
            return self.writer.submit(timed, write_safetensors, self.model_path(layer + 1), tensors)
        done = Future()
        done.set_result(0.0)  # (the seconds of a write)
        return done

    def prune(self, layer: int, stored: dict[str, torch.Tensor]) -> tuple[BlockRecord, Future]:
        """Score, slice and pass on block `layer`; returns its record and the future of its shard write."""
        t0, timer = time.time(), PhaseTimer(self.device, self.cfg.profile)
        spec, sizes = self.model.arch.blocks[layer], self.shape.sizes[layer]
        dtype = self.stream.dtype(stored)
        if sizes is None:
            return self.drop(layer, spec, stored, dtype, t0)
        out_layer = self.shape.out_layer(layer)
        with timer.phase("to_device"):
            W = {k: t.to(self.device, dtype, non_blocking=True) for k, t in stored.items()}
        targets = KeptTargets(self.stream, layer, dtype, timer)
        mlp = KeptMlp() if self.ctx.keep_mlp else None
        calib = self.ctx.calibration(self.stream, layer, dtype, timer, targets, self.shape.ridges_of(layer), mlp)
        with torch.no_grad():
            with timer.phase("score"):
                scores = self.cfg.scorer(sizes).score(W, spec, calib)
            with timer.phase("slice"):
                # rank 0's, exactly
                kept = self.ranks.broadcast(select_units(scores.heads, scores.neurons, spec, sizes))
                W_new, spec_new = slice_block(W, spec, kept)
            with timer.phase("compensate"):
                W_new = self.ranks.broadcast_tensors(self.cfg.compensation.apply(W, spec, W_new, spec_new, kept, calib,
                                                                             self.biases))
            spec_new = spec_new.with_biases(self.biases)
            W_new = add_zero_biases(W_new, spec_new)
            t_score = time.time()
            with timer.phase("to_host"):
                out = [OutTensor.of(self.model.arch.layer_tensor(out_layer, s),
                                    t.to("cpu", stored.get(s, stored["o"]).dtype)) for s, t in W_new.items()
                       ] if self.ranks.is_writer else []
            write = self.write_shard(layer, out)
            kept_mlp = mlp.behind(W, W_new, kept.heads, kept.neurons, self.stream.n_batches) if mlp else None
            del mlp, calib
            rel_error = self.pass_outputs(layer, W, spec, W_new, spec_new, dtype, timer, targets, kept_mlp)
        self.cache.path(layer, "targets").unlink(missing_ok=True)  # read for the last time
        return BlockRecord(
            layer, [spec.n_heads, spec_new.n_heads], [spec.n_kv, spec_new.n_kv],
            [spec.intermediate, spec_new.intermediate], [spec.n_params(), spec_new.n_params()], rel_error,
            kept.heads.tolist(), kept.kv.tolist(), scores.info,
            {"score_seconds": round(t_score - t0, 3), "forward_seconds": round(time.time() - t_score, 3),
             "phases": timer.rounded()}), write

    def drop(self, layer: int, spec, stored, dtype, t0: float) -> tuple[BlockRecord, Future]:
        """A dropped block: its shard holds no tensor, and its inputs pass on unchanged (the pruned
        model's stream), or its dense outputs with --calibrate-on dense."""
        write = self.write_shard(layer, [])
        dense = self.cfg.calibrate_on == "dense"
        W = {k: t.to(self.device, dtype) for k, t in stored.items()} if dense else None
        writer = self.stream.outputs(layer)
        with torch.no_grad():
            for start, x in self.stream.batches(layer, dtype):
                writer.write(start, block_forward(W, spec, x, self.ctx.cos, self.ctx.sin) if dense else x)
        writer.commit()
        return BlockRecord(layer, [spec.n_heads, 0], [spec.n_kv, 0], [spec.intermediate, 0], [spec.n_params(), 0],
                           1.0, timing={"score_seconds": 0.0, "forward_seconds": round(time.time() - t0, 3)},
                           dropped=True), write

    def pass_outputs(self, layer, W, spec, W_new, spec_new, dtype, timer: PhaseTimer | None = None,
                     targets: "KeptTargets | None" = None, kept_mlp: list | None = None) -> float:
        """Run the pruned block on the calibration inputs; its outputs are the next block's
        inputs (so later blocks are calibrated on what they will really see), or the dense
        block's outputs with --calibrate-on dense. Returns the relative squared error of the
        pruned against the dense block output (read back when scoring kept it). `kept_mlp`: the
        cut block's residual after attention and MLP activations of each micro-batch, kept by the
        last MLP pass (scoring.base.KeptMlp): only down_proj is left to run."""
        writer = self.stream.outputs(layer)
        err = ref = 0.0
        dense = iter(targets.batches()) if targets is not None and targets.ready else None
        for i, (start, x) in enumerate(timed_batches(self.stream.batches(layer, dtype), timer)):
            y_dense = next(dense) if dense is not None else None
            with phase(timer, "output_forward"):
                if y_dense is None:
                    y_dense = block_forward(W, spec, x, self.ctx.cos, self.ctx.sin)
                if kept_mlp is not None:
                    h, a = kept_mlp[i]
                    y = h + F.linear(a, W_new["down"], W_new.get("down_bias"))
                else:
                    y = block_forward(W_new, spec_new, x, self.ctx.cos, self.ctx.sin)
                check_finite_activations(y, layer, start)
                err += squared_norm(y - y_dense)
                ref += squared_norm(y_dense - x)
            with phase(timer, "cache_write"):
                writer.write(start, y_dense if self.cfg.calibrate_on == "dense" else y)
        writer.commit()
        err, ref = self.ranks.sum_float(err), self.ranks.sum_float(ref)
        return err / max(ref, 1e-30)

    def model_path(self, k: int) -> Path:
        return self.cfg.out / shard_name(k, self.n_shards)

    def prune_blocks(self, journal: Journal, start: int) -> None:
        """Blocks start..L-1 with prefetch and asynchronous writes. Block i is journaled (and its
        inputs dropped) after its shard is written, while block i+1 is already being scored."""
        L = self.model.arch.n_layers
        next_read, pending = None, None
        with progress_bar("pruning", L, start, self.cfg.progress) as bar:
            for layer in self.stream.blocks(start, bar):
                t0 = time.time()
                W, read_seconds = (next_read or self.prefetch(layer)).result()
                wait = time.time() - t0
                next_read = self.prefetch(layer + 1) if layer + 1 < L and self.cfg.overlap else None
                record, write = self.prune(layer, W)
                fault_point("after_scoring")
                del W
                if not self.cfg.overlap:
                    write.result()
                record.timing.update(read_seconds=round(read_seconds, 3), read_wait_seconds=round(wait, 3))
                if pending is not None:
                    self.finish(journal, *pending)
                pending = (record, write)
            if pending is not None:
                self.finish(journal, *pending)

    def finish(self, journal: Journal, record: BlockRecord, write: Future) -> None:
        t0, layer, timing = time.time(), record.layer, record.timing
        write_seconds = write.result()
        fault_point("before_journal")
        timing["write_wait_seconds"] = round(time.time() - t0, 3)
        timing["write_seconds"] = round(write_seconds, 3)
        timing["seconds"] = round(sum(v for k, v in timing.items()
                                      if k.endswith("_seconds") and k not in ("read_seconds", "write_seconds")), 3)
        self.ranks.barrier()  # every rank's inputs of block layer + 1 are on disk
        if self.ranks.is_writer:
            journal.finish_block(layer, record.as_json())
        self.ranks.barrier()  # block `layer` is journaled: its inputs can go
        self.cache.drop(layer)
        log.info("pruned block %d: heads %d -> %d, KV heads %d -> %d, neurons %d -> %d, relative error %.4g, %.1fs",
                 layer, *record.heads, *record.kv_heads, *record.neurons, record.relative_error, timing["seconds"],
                 extra=FILE_ONLY)


class KeptTargets(Targets):
    """The dense outputs of block `layer` on this rank's calibration inputs, kept in the activation
    cache beside them by the first pass that computes them (scoring's), read back by the later
    ones (compensation, the output pass), so the dense block runs once per block. A file of this
    process alone: a resumed run computes it again."""

    def __init__(self, stream: BlockStream, layer: int, dtype: torch.dtype, timer: PhaseTimer | None):
        self.stream, self.layer, self.dtype, self.timer = stream, layer, dtype, timer
        self.ready = False

    def keeper(self) -> "TargetWriter":
        return TargetWriter(self)

    def batches(self):
        yield from timed_batches((y for _, y in self.stream.batches(self.layer, self.dtype, "targets", tick=False)),
                                 self.timer)


class TargetWriter(TargetKeeper):
    def __init__(self, targets: KeptTargets):
        self.targets, self.start = targets, 0
        self.writer = targets.stream.writer(targets.layer, "targets")

    def add(self, y: torch.Tensor) -> None:
        with phase(self.targets.timer, "cache_write"):
            self.writer.write(self.start, y)
        self.start += y.shape[0]

    def done(self) -> None:
        with phase(self.targets.timer, "cache_write"):
            self.writer.commit(durable=False)
        self.targets.ready = True


def squared_norm(t: torch.Tensor) -> float:
    """|t|^2, accumulated in fp64 (without an fp64 copy of t)."""
    return torch.linalg.vector_norm(t, dtype=torch.float64).item() ** 2


def timed(f, *args) -> float:
    """Seconds f(*args) took (a shard write, on the writer thread)."""
    t0 = time.time()
    f(*args)
    return time.time() - t0
