"""Scorers: (block weights, calibration inputs) -> an importance score per query head and per
MLP neuron; higher means more important. Each method is one module with one class; the
pipeline looks it up in SCORERS and never branches on the method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from ..families import BlockSpec


@dataclass(frozen=True)
class UnitScores:
    heads: torch.Tensor  # (H,) query heads, group-major (head h belongs to KV group h // group)
    neurons: torch.Tensor  # (I,)


@dataclass
class Calibration:
    """A block's calibration inputs, streamed from the activation cache in micro-batches."""

    batches: Callable[[], Iterator[torch.Tensor]]  # each call starts a fresh pass: (b, T, E) tensors
    cos: torch.Tensor  # (T, D) rotary tables
    sin: torch.Tensor
    generator: torch.Generator  # seeded per block, for methods that sample


class Scorer(Protocol):
    name: str
    needs_calibration: bool

    def score(self, W: dict[str, torch.Tensor], spec: BlockSpec, calib: Calibration) -> UnitScores: ...


def _registry() -> dict[str, type]:
    from .magnitude import MagnitudeScorer
    return {cls.name: cls for cls in (MagnitudeScorer,)}


SCORERS: dict[str, type] = _registry()


def make_scorer(method: str, **options) -> Scorer:
    return SCORERS[method](**options)
