"""Shared numerics: the per-token weighting of errors, ridge strength, and reproducible solves.

Resume must write the same bytes as an uninterrupted run, so every result must be bit-identical
across processes. Two things in LAPACK (MKL) are not: pivoted least squares (`torch.linalg.lstsq`'s
default driver; streamprune never calls it) and, under load, multithreaded factorizations. Solves
therefore run on one thread on a CPU (they are small next to the forwards: ridge systems of masks
x masks, one Cholesky per compensated projection, the OBS inverse)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .ranks import SINGLE, Ranks

RIDGE = 1e-2  # ridge of least-squares refits and OBS, relative to the mean of diag(G), where none was measured
RIDGE_STEP = 10 ** 0.5  # the ridges tried on held-out tokens (held_out_refit): RIDGE times powers of this
FP64_SOLVE_MAX = 4096  # larger Gram matrices are kept and factored in fp32 (half the memory)
SYMMETRIC_MIN, SYMMETRIC_BLOCKS = 512, 4  # Gram matrices this wide are formed by blocks of their lower triangle


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reproducible(t: torch.Tensor):
    """One thread for a factorization on the CPU; nothing to do on a GPU."""
    return one_thread() if t.device.type == "cpu" else nullcontext()


def mean_square(y: torch.Tensor) -> torch.Tensor:
    """mean(y_t^2) of each token (the last dim): what the next RMSNorm divides by, squared."""
    return y.pow(2).mean(-1).clamp_min(1e-12)


def token_scale(y: torch.Tensor) -> torch.Tensor:
    """1 / rms of each token of the residual stream (fp32). Errors times this are errors as the
    next block's RMSNorm sees them; squared, it is the perturb scorer's token weight."""
    return mean_square(y.float()).rsqrt()


def token_weight(y: torch.Tensor) -> torch.Tensor:
    """1 / mean(y_t^2) of each token (fp64): the weight of a token's squared error."""
    return 1 / mean_square(y.double())


def add_ridge(G: torch.Tensor, ridge: float) -> torch.Tensor:
    """G + lam I in place, lam = ridge * mean(diag G); returns lam."""
    lam = ridge * G.diagonal().mean().clamp_min(1e-12)
    G.diagonal().add_(lam)
    return lam


def solve_spd(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with G X = rhs for a symmetric positive definite G: by Cholesky, or a general solve
    where the factorization fails."""
    with reproducible(G):
        L, info = torch.linalg.cholesky_ex(G)
        return torch.cholesky_solve(rhs, L) if info.item() == 0 else torch.linalg.solve(G, rhs)


def invert_spd(G: torch.Tensor) -> torch.Tensor:
    """G^-1 for a symmetric positive definite G: by Cholesky, or a general inverse where it fails."""
    with reproducible(G):
        L, info = torch.linalg.cholesky_ex(G)
        return torch.cholesky_inverse(L) if info.item() == 0 else torch.linalg.inv(G)


def solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    with reproducible(A):
        return torch.linalg.solve(A, B)


@dataclass(frozen=True)
class Ridges:
    """How strongly one block's least-squares refits lean on the original weights, relative to the
    mean of diag(G): o_proj's over the kept heads, down_proj's over the kept neurons (OBS's greedy
    selection too). With calibration tokens not much more than a Gram matrix's columns, a refit
    that fits them closely fails on other tokens, so the survey measures each block's on tokens
    it holds out (held_out_refit); RIDGE where nothing was measured (the fixed rule)."""

    heads: float = RIDGE
    neurons: float = RIDGE

    def as_json(self) -> dict:
        return {"heads": self.heads, "neurons": self.neurons}

    @classmethod
    def from_json(cls, d: dict | None) -> "Ridges":
        return cls() if d is None else cls(float(d["heads"]), float(d["neurons"]))


def held_out_refit(G: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, A: torch.Tensor
                   ) -> tuple[float, torch.Tensor]:
    """The ridge (RIDGE times a power of RIDGE_STEP, from RIDGE / 10 to 100 RIDGE) under which
    refitting W (out, in) on its inputs `keep` alone, towards W's own output on the Gram G of the
    fitting tokens, errs least on held-out tokens A (n, in, already weighted): one ridge in each of
    three decades, then the steps beside the best; at most five factorizations of the kept inputs.
    Returns it and W refit under it (out, in; the columns not kept zero)."""
    keep = keep.to(G.device)
    W = W.to(G.device, G.dtype)
    A = A.to(G.device, G.dtype)
    target = A @ W.T  # (n, out)
    C = torch.cat([G[keep[i:i + 1024]] @ W.T for i in range(0, len(keep), 1024)])  # (kept, out), G[keep] in parts
    W0, A_kept = W[:, keep].T, A[:, keep]
    errors: dict[int, float] = {}
    best: list = [None, None]  # (error, refit) of the best ridge so far

    def error(k: int) -> float:  # ridge RIDGE * RIDGE_STEP ** k
        if k not in errors:
            G_kept = G[keep[:, None], keep[None, :]]
            lam = add_ridge(G_kept, RIDGE * RIDGE_STEP ** k)
            X = solve_spd(G_kept, C + lam * W0)  # (kept, out)
            errors[k] = (A_kept @ X - target).pow(2).sum().item()
            if best[0] is None or errors[k] < best[0]:
                best[:] = errors[k], X
        return errors[k]

    k = min((-1, 1, 3), key=error)
    k = min((k - 1, k, k + 1), key=error)
    refit = torch.zeros_like(W)
    refit[:, keep] = best[1].T
    return RIDGE * RIDGE_STEP ** k, refit


@dataclass(frozen=True)
class GramPlacement:
    """Where the large Gram matrices (OBS on down_proj's inputs, the least-squares refits) live and
    are factored: beside the block on its device (the default), or in host memory (`host`: a GPU
    too small for them), where A^T B is formed `columns` columns at a time on the device so the
    device holds an n x `columns` product, not n x n. The plan chooses (plan.place_grams)."""

    host: bool = False
    columns: int = 0  # 0: all at once

    def as_dict(self) -> dict:
        return {"grams_on": "host" if self.host else "device", "gram_chunk_columns": self.columns}

    @classmethod
    def of(cls, d: dict) -> "GramPlacement":
        """The placement `as_dict` describes (as pinned in the journal)."""
        return cls(host=d["grams_on"] == "host", columns=int(d["gram_chunk_columns"]))


ON_DEVICE = GramPlacement()


def gram_dtype(n: int) -> torch.dtype:
    """The dtype a Gram matrix of n columns is kept and factored in: fp64 up to FP64_SOLVE_MAX, fp32 beyond."""
    return torch.float64 if n <= FP64_SOLVE_MAX else torch.float32


def add_gram(G: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor | None = None, dtype: torch.dtype | None = None,
             placement: GramPlacement = ON_DEVICE) -> torch.Tensor:
    """G + A^T B (B defaults to A; rows are tokens) in `dtype` (default: fp64 up to FP64_SOLVE_MAX
    columns of A, fp32 beyond), kept where `placement` says. On the device and all at once it is
    the plain sum; in column blocks each block is the same product's columns. A^T A of
    SYMMETRIC_MIN columns or more is formed by column blocks on and below the diagonal only, the
    rest mirrored: 5/8 of the multiply-adds (the Gram matrices are the largest products of a run)."""
    symmetric = B is None and A.shape[1] >= SYMMETRIC_MIN
    B = A if B is None else B
    n, m = A.shape[1], B.shape[1]
    dtype = dtype or gram_dtype(n)
    where = torch.device("cpu") if placement.host else A.device
    step = placement.columns or m
    if symmetric:
        step = min(step, -(-m // SYMMETRIC_BLOCKS))
    if step >= m:
        part = (A.T @ B).to(where, dtype)
        return part if G is None else G.add_(part)
    if G is None:
        G = torch.zeros(n, m, dtype=dtype, device=where)
    for j in range(0, m, step):
        low = j if symmetric else 0  # (symmetric: the rows from the diagonal block down)
        G[low:, j:j + step] += (A[:, low:].T @ B[:, j:j + step]).to(where, dtype)
    if symmetric:  # the blocks above the diagonal, from those below
        for j in range(0, m, step):
            G[j:j + step, j + step:] = G[j + step:, j:j + step].T
    return G


class NormalEquations:
    """Streaming accumulation of G = A^T A and C = A^T Y and the ridge solve: in fp64 up to
    FP64_SOLVE_MAX inputs, in fp32 beyond, where the solve is fp32 anyway (as OBS keeps its Gram).
    `ranks` adds the other ranks' parts (several processes), once, before the first use."""

    def __init__(self, placement: GramPlacement = ON_DEVICE, ranks: Ranks = SINGLE):
        self.G = self.C = None
        self.placement = placement
        self.ranks = ranks

    def add(self, A: torch.Tensor, Y: torch.Tensor | None, scale: torch.Tensor) -> None:
        """Rows of A and Y (tokens) weighted by `scale` (per token). Y None: only G (C given later)."""
        s = scale.reshape(-1, 1).float()
        A = A.reshape(-1, A.shape[-1]).float() * s
        self.G = add_gram(self.G, A, placement=self.placement)  # (in gram_dtype of A's columns)
        if Y is not None:
            self.C = add_gram(self.C, A, Y.reshape(-1, Y.shape[-1]).float() * s, placement=self.placement)

    def summed(self) -> "NormalEquations":
        """Every rank's parts added; later solves and restrictions add nothing more."""
        self.G = self.ranks.sum_(self.G)
        if self.C is not None:
            self.C = self.ranks.sum_(self.C)
        self.ranks = SINGLE
        return self

    @classmethod
    def of(cls, G: torch.Tensor, C: torch.Tensor) -> "NormalEquations":
        """Equations already summed."""
        eq = cls()
        eq.G, eq.C = G, C
        return eq

    def restricted(self, inputs: torch.Tensor) -> "NormalEquations":
        """The equations of a regression on the inputs (columns of A) listed: their rows of G and C."""
        inputs = inputs.to(self.G.device)
        return NormalEquations.of(self.G[inputs][:, inputs], self.C[inputs])

    def solve(self, W0: torch.Tensor, ridge: float) -> torch.Tensor:
        """The (out, in) weight minimising |A W^T - Y|^2 + lam |W - W0|^2. Large systems are
        factored in fp32 (the ridge keeps them well conditioned) to halve the memory. Consumes G."""
        self.summed()
        G, self.G = self.G, None
        lam = add_ridge(G, ridge)
        rhs = self.C.add_(lam * W0.T.to(self.C.device, self.C.dtype))
        return solve_spd(G, rhs).T.to(W0.device, W0.dtype).contiguous()
