"""Reproducible numerics. Resume must write the same bytes as an uninterrupted run, so every
result must be bit-identical across processes. Two things in LAPACK (MKL) are not: pivoted least
squares (`torch.linalg.lstsq`'s default driver; streamprune never calls it) and, under load,
multithreaded factorizations. Solves therefore run on one thread (they are small next to the
forwards: ridge systems of masks x masks, and one Cholesky per compensated projection)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
