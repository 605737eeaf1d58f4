"""Weight-magnitude baseline: a unit matters as much as the norms of the weights that read and
write it. Needs no calibration data."""

from __future__ import annotations

import torch

from ...arch.spec import BlockSpec
from .base import Calibration, Scorer, UnitScores


class MagnitudeScorer(Scorer):
    name = "magnitude"
    needs_calibration = False

    def score(self, W: dict[str, torch.Tensor], spec: BlockSpec, calib: Calibration | None = None) -> UnitScores:
        H, D = spec.n_heads, spec.head_dim
        q = W["q"].float().view(H, D, -1).norm(dim=(1, 2))  # (H,)
        o = W["o"].float().view(-1, H, D).norm(dim=(0, 2))  # (H,)
        neurons = W["gate"].float().norm(dim=1) * W["up"].float().norm(dim=1) * W["down"].float().norm(dim=0)
        return UnitScores(heads=q * o, neurons=neurons)
