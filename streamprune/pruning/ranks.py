"""What the math sees of the processes of a data-parallel run (engine/distributed.py starts them):
`Ranks` sums partial statistics over them (`sum_`, all-reduce in place), gathers rows in window
order, broadcasts rank 0's decisions; a single process uses `SINGLE`, whose methods do nothing and
never touch torch.distributed. `Share` is a rank's part of the calibration windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class Ranks:
    """One process: every method is the identity (no torch.distributed)."""

    rank, world = 0, 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the output, the journal and report.json, and holds the lock."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (every rank gets the same bits)."""
        return t

    def sum_float(self, x: float) -> float:
        return x

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The rows (dim 0) of `t` of every rank, concatenated in rank order (= window order)."""
        return t

    def broadcast(self, obj):
        """Rank 0's `obj` (picklable) on every rank."""
        return obj

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rank 0's tensors (same names, shapes and dtypes on every rank) on every rank."""
        return tensors

    def barrier(self) -> None:
        pass

    def share(self, samples: int, batch: int) -> Share:
        """This rank's calibration windows: a contiguous run of whole micro-batches of `batch`."""
        return Share(samples, batch, batch_share(samples, batch, self.world, self.rank))

    def close(self) -> None:
        pass


SINGLE = Ranks()


def batch_share(samples: int, batch: int, world: int, rank: int) -> range:
    """Windows of `rank` among `world`: the micro-batches of `batch` windows split into `world`
    contiguous runs as even as can be, so every rank's micro-batches are the single process's."""
    n = -(-samples // batch)
    first, last = rank * n // world, (rank + 1) * n // world
    return range(first * batch, min(last * batch, samples))
