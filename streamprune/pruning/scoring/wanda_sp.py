"""Wanda-SP (structured Wanda, as the FLAP paper's baseline): a unit's importance is
sum over the output-projection weights that read it of |W_ij| * ||X_j||, with ||X_j|| the
L2 norm of input channel j over the calibration tokens."""

from __future__ import annotations

import torch

from ...arch.spec import BlockSpec
from .activations import channel_stats, per_head
from .base import Calibration, Scorer, UnitScores


class WandaSPScorer(Scorer):
    name = "wanda-sp"

    def score(self, W: dict[str, torch.Tensor], spec: BlockSpec, calib: Calibration) -> UnitScores:
        stats = channel_stats(W, spec, calib)
        o = W["o"].double().abs().sum(0).cpu() * stats.head_sumsq.sqrt()
        down = W["down"].double().abs().sum(0).cpu() * stats.neuron_sumsq.sqrt()
        return UnitScores(heads=per_head(o, spec), neurons=down)
