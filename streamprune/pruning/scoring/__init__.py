"""Scorers: (block weights, calibration inputs) -> an importance score per query head and per
MLP neuron; higher means more important. Each method is one module with one class; the
pipeline looks it up in SCORERS and never branches on the method."""

from __future__ import annotations

from .base import Calibration, Scorer, ScoringOptions, UnitScores
from .flap import FlapScorer
from .magnitude import MagnitudeScorer
from .perturb import PerturbScorer
from .wanda_sp import WandaSPScorer

__all__ = ["Calibration", "Scorer", "ScoringOptions", "UnitScores", "SCORERS", "make_scorer"]

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (PerturbScorer, MagnitudeScorer, WandaSPScorer,
                                                                FlapScorer)}


def make_scorer(method: str, options: ScoringOptions = ScoringOptions()) -> Scorer:
    return SCORERS[method](options)
