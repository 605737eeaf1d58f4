"""Data-parallel pruning over several processes (`torchrun`): every per-block quantity is a sum over
calibration windows, so each process (rank) holds the current block and a contiguous share of the
windows, computes its partial sums, and an all-reduce combines them. Every rank then takes the
same decisions from the same sums; rank 0's are broadcast where a decision must be exactly
shared (kept units, refit weights, survey costs), and rank 0 alone writes the output.

`Ranks` is what the math sees: `sum_` (all-reduce in place), `gather` (rows of every rank, in
window order), `broadcast`, `barrier`. A single process uses `SINGLE`, whose methods do nothing,
and never imports or initialises torch.distributed."""

from __future__ import annotations

import datetime
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import StreamPruneError
from ..pruning.ranks import SINGLE, Ranks

TIMEOUT_ENV = "STREAMPRUNE_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT = 1800


class ProcessGroupRanks(Ranks):
    """torch.distributed: gloo for tensors on the host, NCCL for CUDA tensors."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def call(self, what: str, fn, *args):
        """Run a collective; a rank that died or hung becomes a one-line error."""
        try:
            return fn(*args)
        except (RuntimeError, ConnectionError) as e:  # torch.distributed.DistError is a RuntimeError
            detail = re.sub(r"^\[[^\]]*\] ", "", (str(e).strip().splitlines() or ["no detail"])[0])[:120]
            raise StreamPruneError(
                f"rank {self.rank}: lost the other ranks during {what} (a rank died or timed out: {detail}); "
                "the job stops: re-run the same command to resume") from None

    def sum_(self, t):
        import torch.distributed as dist
        return self.call("an all-reduce", lambda: (dist.all_reduce(t, op=dist.ReduceOp.SUM), t)[1])

    def sum_float(self, x):
        return float(self.sum_(torch.tensor([x], dtype=torch.float64)).item())

    def gather(self, t):
        import torch.distributed as dist
        t = t.contiguous()
        sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(self.world)]
        self.call("a gather", dist.all_gather, sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
        sizes = [int(s.item()) for s in sizes]
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.call("a gather", dist.all_gather, parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def broadcast(self, obj):
        import torch.distributed as dist
        box = [obj]
        self.call("a broadcast", dist.broadcast_object_list, box, 0)
        return box[0]

    def broadcast_tensors(self, tensors):
        import torch.distributed as dist
        tensors = {k: t.contiguous() for k, t in tensors.items()}
        for name in sorted(tensors):
            self.call("a broadcast", dist.broadcast, tensors[name], 0)
        return tensors

    def barrier(self):
        import torch.distributed as dist
        self.call("a barrier", dist.barrier)

    def close(self):
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_cache_folder(folder: Path, ranks: Ranks) -> Path:
    """Rank k's activation cache (its windows only): the run's cache folder for rank 0, beside it
    with the suffix -rank<k> for the others."""
    return folder if ranks.rank == 0 else folder.with_name(f"{folder.name}-rank{ranks.rank}")


def other_rank_cache_folders(folder: Path) -> list[Path]:
    """The caches of ranks other than 0 beside the run's cache `folder` (rank_cache_folder's names)."""
    return sorted(folder.parent.glob(f"{glob.escape(folder.name)}-rank*"))


def shared_micro_batch(micro_batch: int, samples: int, world: int) -> int:
    """The micro-batch of a run over `world` ranks: at most samples // world windows, so there are
    at least `world` micro-batches and every rank has one."""
    return max(1, min(micro_batch, samples // world))


def join_ranks(device: str) -> Ranks:
    """The ranks of this job: SINGLE unless started by torchrun with WORLD_SIZE > 1 (then the
    process group is joined: NCCL for CUDA tensors, gloo for host tensors)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    import torch.distributed as dist
    if not dist.is_available():
        raise StreamPruneError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise StreamPruneError(f"{TIMEOUT_ENV} must be a number of seconds") from None
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise StreamPruneError(f"rank {rank}: cannot join the other {world - 1} ranks: "
                               f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None
    return ProcessGroupRanks(rank, world)


@dataclass(frozen=True)
class Share:
    """A rank's part of the calibration windows: `windows`, a contiguous run of whole micro-batches
    of `batch` among `samples` windows."""

    samples: int
    batch: int
    windows: range

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Windows in each micro-batch of every rank, in window order."""
        return tuple(min(self.batch, self.samples - s) for s in range(0, self.samples, self.batch))

    @property
    def local(self) -> range:
        """The indices of this rank's micro-batches among batch_sizes."""
        return range(self.windows.start // self.batch, -(-self.windows.stop // self.batch))


def batch_share(samples: int, batch: int, world: int, rank: int) -> range:
    """Windows of `rank` among `world`: the micro-batches of `batch` windows split into `world`
    contiguous runs as even as can be, so every rank's micro-batches are the single process's."""
    n = -(-samples // batch)
    first, last = rank * n // world, (rank + 1) * n // world
    return range(first * batch, min(last * batch, samples))


def window_share(ranks: Ranks, samples: int, batch: int) -> Share:
    """This rank's calibration windows: a contiguous run of whole micro-batches of `batch`."""
    return Share(samples, batch, batch_share(samples, batch, ranks.world, ranks.rank))
