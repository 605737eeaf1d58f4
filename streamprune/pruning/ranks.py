"""What the math sees of the processes of a data-parallel run (engine/distributed.py starts them):
`Ranks` sums partial statistics over them (`sum_`, all-reduce in place), gathers rows in window
order, broadcasts rank 0's decisions; a single process uses `SINGLE`, whose methods do nothing and
never touch torch.distributed. How the windows are split among the ranks is engine/distributed.py's."""

from __future__ import annotations

import torch


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

    def close(self) -> None:
        pass


SINGLE = Ranks()


