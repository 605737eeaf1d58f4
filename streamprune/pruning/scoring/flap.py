"""FLAP (An et al., 2024): a channel's fluctuation — the variance of its activation over the
calibration tokens — times the squared norm of the output-projection column that reads it. A
channel that barely fluctuates can be replaced by its mean, which FLAP does with a bias:
`--compensate mean` (compensate.MeanBias) where the output family can carry biases (Llama, and
Qwen3's attention); `--compensate lsq` refits instead (docs/scoring.md)."""

from __future__ import annotations

import torch

from ...arch.spec import BlockSpec
from .activations import channel_stats, per_head
from .base import Calibration, Scorer, UnitScores


class FlapScorer(Scorer):
    name = "flap"

    def score(self, W: dict[str, torch.Tensor], spec: BlockSpec, calib: Calibration) -> UnitScores:
        stats = channel_stats(W, spec, calib)
        o = stats.head_var * W["o"].double().pow(2).sum(0).cpu()
        down = stats.neuron_var * W["down"].double().pow(2).sum(0).cpu()
        return UnitScores(heads=per_head(o, spec), neurons=down)
