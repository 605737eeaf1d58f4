"""The scorer interface: what every method gets (a block's weights, its calibration inputs, the
options) and returns (UnitScores)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ...arch.spec import BlockSpec
from ..numerics import ON_DEVICE, GramPlacement, Ridges
from ..phases import PhaseTimer
from ..ranks import SINGLE, Ranks
from ..selection import Sizes


@dataclass(frozen=True)
class UnitScores:
    heads: torch.Tensor  # (H,) query heads, group-major (head h belongs to KV group h // group)
    neurons: torch.Tensor  # (I,)
    info: dict = field(default_factory=dict)  # how they were obtained, for report.json

    def __post_init__(self):  # selection works on the host, whichever device scored
        object.__setattr__(self, "heads", self.heads.cpu())  # (frozen dataclass)
        object.__setattr__(self, "neurons", self.neurons.cpu())


class Targets:
    """Where one block's dense outputs on its calibration inputs are kept between passes (the
    pruning pass keeps them in the activation cache). `keeper()` takes them micro-batch by
    micro-batch, in order; `batches()` yields them back, in the micro-batches of the inputs."""

    ready: bool = False

    def keeper(self) -> "TargetKeeper":
        raise NotImplementedError

    def batches(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class TargetKeeper:
    def add(self, y: torch.Tensor) -> None:
        raise NotImplementedError

    def done(self) -> None:
        raise NotImplementedError


class KeptMlp:
    """What the last pass over a block's MLP saw, kept (where the memory plan has room) so the output
    pass need not run the block again: per micro-batch, h (the residual stream after attention) and
    a (the MLP activations), and what they were computed behind: the kept heads and o_proj (None:
    the dense attention) and the neurons (None: all)."""

    def __init__(self):
        self.start(None, None, None)

    def start(self, heads: torch.Tensor | None, o_proj: torch.Tensor | None, neurons: torch.Tensor | None) -> None:
        self.heads, self.o_proj, self.neurons = heads, o_proj, neurons
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.complete = False

    def add(self, h: torch.Tensor, a: torch.Tensor) -> None:
        self.parts.append((h, a))

    def done(self) -> None:
        self.complete = True

    def behind(self, W: dict, W_new: dict, kept_heads: torch.Tensor, kept_neurons: torch.Tensor,
               batches: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(h, a) of each of `batches` micro-batches as the cut block W_new computes them (a over its
        kept neurons), where what was kept was computed behind W_new's own attention (its kept heads
        and o_proj) and MLP input; None where it was not (the output pass then runs the block)."""
        if not self.complete or len(self.parts) != batches:
            return None
        if self.heads is None:  # the dense attention: W_new must keep it whole
            if not torch.equal(W_new["o"], W["o"]):
                return None
        elif not torch.equal(self.heads.cpu(), kept_heads.cpu()) or not torch.equal(self.o_proj, W_new["o"]):
            return None
        if not same_bias(W.get("o_bias"), W_new.get("o_bias")):
            return None
        if self.neurons is None:
            cols = kept_neurons.to(self.parts[0][1].device)
            return [(h, a.index_select(-1, cols)) for h, a in self.parts]
        return list(self.parts) if torch.equal(self.neurons.cpu(), kept_neurons.cpu()) else None


def same_bias(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Two optional biases add the same (None adds nothing, as a zero bias does)."""
    if a is None or b is None:
        return all(t is None or not t.any() for t in (a, b))
    return torch.equal(a, b)


@dataclass
class Calibration:
    """A block's calibration inputs, streamed from the activation cache in micro-batches."""

    batches: Callable[[], Iterator[torch.Tensor]]  # each call starts a fresh pass: (b, T, E) tensors
    cos: torch.Tensor  # (T, D) rotary tables
    sin: torch.Tensor
    generator: torch.Generator  # seeded per block, for methods that sample
    samples: int = 0  # calibration windows in all batches of all ranks (0: unknown)
    timer: PhaseTimer | None = None  # seconds per phase (phases.py), for report.json
    placement: GramPlacement = ON_DEVICE  # where the large Gram matrices live and are factored
    # Several processes (distributed.py): `batches` yields this rank's micro-batches only;
    # `batch_sizes` are the sizes of every rank's micro-batches in window order and `local` the
    # indices of this rank's among them (so methods that sample draw one random stream for all);
    # partial sums are combined with `ranks`.
    ranks: Ranks = SINGLE
    batch_sizes: tuple[int, ...] = ()  # () : the micro-batches of `batches` are all there are
    local: range = range(0)
    # The dense block's outputs on these inputs, kept by the first pass that computes them so later
    # passes read them instead of running the dense block again (None: always computed).
    targets: Targets | None = None
    # How strongly this block's refits lean on the original weights (the survey's held-out choice)
    ridges: Ridges = Ridges()
    # What a scorer measured that compensation reuses instead of another pass (compensate.py):
    # "attention" -> (kept heads, refit o_proj), "mlp" -> (kept heads, normal equations of all neurons)
    shared: dict = field(default_factory=dict)
    # The last MLP pass's residual and activations (obs.down_equations fills it; None: not kept)
    mlp: KeptMlp | None = None

    def with_targets(self, dense: Callable[[torch.Tensor], tuple[torch.Tensor, object]]
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, object]]:
        """(x, y, extra) for this rank's micro-batches, (y, extra) = dense(x), y the dense block
        output: read back when a pass already kept them (extra None then), else computed (and
        kept, once the pass is complete)."""
        if self.targets is not None and self.targets.ready:
            for x, y in zip(self.batches(), self.targets.batches()):
                yield x, y, None
            return
        keep = self.targets.keeper() if self.targets is not None else None
        for x in self.batches():
            y, extra = dense(x)
            if keep is not None:
                keep.add(y)
            yield x, y, extra
        if keep is not None:
            keep.done()

    def every_batch(self) -> Iterator[tuple[int, torch.Tensor | None]]:
        """(windows, x) for the micro-batches of all ranks in window order; x is None for another
        rank's (its size still tells how much of the random stream it draws)."""
        if not self.batch_sizes:
            yield from ((x.shape[0], x) for x in self.batches())
            return
        mine = self.batches()
        for i, b in enumerate(self.batch_sizes):
            yield b, (next(mine) if i in self.local else None)


@dataclass(frozen=True)
class ScoringOptions:
    """What a scorer may need beyond the block: the sizes the block will be cut to (so sampled
    masks look like the real cut), the compute budget for methods that sample, and whether the
    kept weights will be refit (a unit then costs only what the others cannot make up for)."""

    sizes: Sizes | None = None
    budget: float = 1.0
    refit: bool = True  # least-squares compensation will refit the output projections


class Scorer:
    """Base of every method: `score` maps a block's weights and calibration inputs to UnitScores."""

    name: str
    needs_calibration: bool = True

    def __init__(self, options: ScoringOptions = ScoringOptions()):
        self.options = options

    def score(self, W: dict[str, torch.Tensor], spec: BlockSpec, calib: Calibration) -> UnitScores:
        raise NotImplementedError

    def forward_passes(self, calibration_tokens: int) -> float:
        """Block forwards over all calibration tokens that scoring costs (for time estimates)."""
        return 1.0 if self.needs_calibration else 0.0

    def sample_passes(self, calibration_tokens: int) -> float:
        """The part of forward_passes spent on a fixed token sample, which every process of a
        data-parallel run computes whole (it does not divide among processes)."""
        return 0.0

    def work_bytes(self, spec: BlockSpec) -> int:
        """Memory scoring needs beyond the weights and one micro-batch (for the memory plan)."""
        return 0
