"""How far a block's cut error travels: each block's sensitivity, measured to the model's output.

A survey cost is the error of one block's output on dense inputs. The model's loss sees that error
after every later block, the final norm and lm_head, which damp some blocks' errors and amplify
others' (on Qwen2.5-Coder and SmolLM2 the first and last blocks' several times the middle ones',
docs/quality.md): costs compared across blocks as they are send the cuts where they look cheap.
So the survey measures, per block and cut kind, what a unit of its local cost does at the output:

- probe tokens: the first PROBE_POSITIONS positions of the first windows, PROBE_TOKENS in all
  (attention is causal, so a window's first positions are a window of their own);
- at block i, two probe streams start: the block's output with its reference cuts
  (costs.block_ridges: about half the heads of each group removed and o_proj refit; half the
  neurons removed and down_proj refit) in place of the dense one; every stream started before
  runs through block i dense, as the dense stream does;
- after the last block, each stream's next-token distribution is compared with the dense one's:
  the KL divergence over the dense model's TOP tokens at each position (renormalised; the rest
  of the vocabulary carries little mass and would need all of lm_head for every stream).

The sensitivity of (block, kind) is that KL per unit of the reference cut's local cost; the
allocation multiplies the block's costs by it (weigh). The work: every stream through every later
block, L (L + 2) block forwards of PROBE_TOKENS tokens, (L + 2) PROBE_TOKENS / (calibration tokens)
dense passes (1.6 at 8,192 calibration tokens for 24 blocks; a 70B's 80 blocks at 128 x 2,048
tokens: 0.2)."""

from __future__ import annotations

import torch

from ..arch.spec import BlockSpec
from .block import block_forward, rms_norm
from .costs import BlockCosts
from .numerics import mean_square

PROBE_TOKENS = 512  # tokens every probe stream carries
PROBE_POSITIONS = 256  # the first positions of each probe window
TOP = 64  # the dense model's most likely tokens each KL divergence is taken over
KINDS = ("heads", "mlp")  # each block's two streams, in this order


def probe_shape(windows: int, seq_len: int) -> tuple[int, int]:
    """(windows, positions) of the probe tokens."""
    positions = min(seq_len, PROBE_POSITIONS)
    return min(windows, max(1, PROBE_TOKENS // positions)), positions


def stream_count(n_layers: int) -> int:
    """Streams after the last block: the dense one and two per block."""
    return 1 + len(KINDS) * n_layers


def local_cost(y: torch.Tensor, y_cut: torch.Tensor) -> float:
    """The survey's unit (costs.py): the squared error of y_cut, each token weighted by 1 / mean(y_t^2),
    per output element."""
    y, y_cut = y.double(), y_cut.double()
    return ((y_cut - y).pow(2).sum(-1) / mean_square(y)).sum().item() / y.numel()


def through(W, spec: BlockSpec, streams: torch.Tensor, cos, sin) -> torch.Tensor:
    """streams (S, B, T, E) through the dense block, one at a time."""
    return torch.stack([block_forward(W, spec, s, cos, sin) for s in streams])


def start_probes(W, cuts: dict[str, torch.Tensor], spec: BlockSpec, dense_in: torch.Tensor,
                 dense_out: torch.Tensor, cos, sin) -> tuple[torch.Tensor, list[float]]:
    """The two probes a block starts, (2, B, T, E): its output on the dense stream `dense_in` with
    o_proj, then down_proj, replaced by its reference cut (cuts["o"], cuts["down"]); and their
    local costs against the dense output `dense_out`."""
    probes = torch.stack([block_forward(W | {"o": cuts["o"]}, spec, dense_in, cos, sin),
                          block_forward(W | {"down": cuts["down"]}, spec, dense_in, cos, sin)])
    return probes, [local_cost(dense_out, p) for p in probes]


def top_tokens(hidden: torch.Tensor, head_rows, vocab: int, chunk: int) -> torch.Tensor:
    """(N, TOP) the ids of the TOP largest logits at each of the N final hidden states (after the
    final norm), lm_head read `chunk` rows at a time by head_rows(lo, hi) -> (hi - lo, E)."""
    best_val = best_ids = None
    for lo in range(0, vocab, chunk):
        hi = min(lo + chunk, vocab)
        logits = hidden @ head_rows(lo, hi).T.to(hidden.dtype)
        ids = torch.arange(lo, hi, device=hidden.device).expand_as(logits)
        if best_val is not None:
            logits, ids = torch.cat([best_val, logits], 1), torch.cat([best_ids, ids], 1)
        k = min(TOP, logits.shape[1])
        best_val, where = logits.topk(k, dim=1)
        best_ids = ids.gather(1, where)
    return best_ids


def top_logits(states: torch.Tensor, union_rows: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N, K) logits of the final states (N, E) at the tokens `where` (N, K) indexes in
    union_rows (U, E), lm_head's rows of the tokens any position looks at."""
    return (states.double() @ union_rows.double().T).gather(1, where)


def top_kl(dense: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(dense || other) over the same K tokens (renormalised): logits (N, K)."""
    p, q = torch.log_softmax(dense, -1), torch.log_softmax(other, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def final_states(streams: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """(S, B, T, E) streams after the last block -> (S, B*T, E) after the final norm."""
    return rms_norm(streams, norm, eps).reshape(streams.shape[0], -1, streams.shape[-1])


def sensitivities(kl: list[list[float]], local: list[list[float]]) -> list[tuple[float, float]]:
    """Per block (heads, mlp): KL per unit of local cost, relative to the blocks' median MLP one
    (only ratios between blocks matter to the allocation). A probe that changed nothing measurable
    (local cost 0) takes its block's other kind, or the median."""
    raw = [[k / c if c > 0 else None for k, c in zip(ks, cs)] for ks, cs in zip(kl, local)]
    mlp = sorted(r[1] for r in raw if r[1] is not None)
    median = mlp[len(mlp) // 2] if mlp else 1.0
    median = median if median > 0 else 1.0
    out = []
    for h, m in raw:
        m = m if m is not None else (h if h is not None else median)
        h = h if h is not None else m
        out.append((h / median, m / median))
    return out


def weigh(costs: list[BlockCosts], sens: list[tuple[float, float]] | None) -> list[BlockCosts]:
    """Each block's costs times its sensitivities: head layouts by the heads', the neuron curve by
    the MLP's, dropping the block by the larger."""
    if sens is None:
        return costs
    return [BlockCosts({k: v * h for k, v in c.heads.items()}, [(n, v * m) for n, v in c.neurons],
                       c.drop * max(h, m), c.ridges) for c, (h, m) in zip(costs, sens)]
