"""numerics: the SPD solves and inverse agree with torch.linalg (also where Cholesky fails), add_gram
is A^T B however it is blocked, first_bad_value finds a NaN or an Inf, held_out_refit chooses its
ridge by held-out tokens."""

import pytest
import torch

from streamprune.pruning.numerics import (
    RIDGE,
    RIDGE_STEP,
    SYMMETRIC_BLOCKS,
    SYMMETRIC_MIN,
    GramPlacement,
    Ridges,
    add_gram,
    add_ridge,
    held_out_refit,
    invert_spd,
    solve_spd,
)
from streamprune.store.finite import first_bad_value


def spd(n: int, seed: int = 0) -> torch.Tensor:
    A = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return A.T @ A + 0.1 * torch.eye(n, dtype=torch.float64)


def test_solve_and_invert_spd_match_torch_linalg():
    G, rhs = spd(12), torch.randn(12, 3, dtype=torch.float64)
    torch.testing.assert_close(solve_spd(G, rhs), torch.linalg.solve(G, rhs))
    torch.testing.assert_close(invert_spd(G), torch.linalg.inv(G))


def test_a_matrix_that_is_not_positive_definite_falls_back_to_a_general_solve():
    G = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))  # invertible, Cholesky fails
    rhs = torch.ones(3, 1, dtype=torch.float64)
    torch.testing.assert_close(solve_spd(G, rhs), torch.tensor([[0.5], [-1.0], [1 / 3]], dtype=torch.float64))
    torch.testing.assert_close(invert_spd(G), torch.diag(1 / G.diagonal()))


def test_solves_restore_the_thread_count():
    n = torch.get_num_threads()
    solve_spd(spd(4), torch.ones(4, 1, dtype=torch.float64))
    assert torch.get_num_threads() == n


@pytest.mark.parametrize("placement", [GramPlacement(), GramPlacement(host=True, columns=3)])
def test_add_gram_is_a_transpose_b_and_accumulates(placement):
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(20, 7, generator=g), torch.randn(20, 5, generator=g)
    G = add_gram(None, A, B, placement=placement)
    assert G.dtype == torch.float64 and G.shape == (7, 5)  # (products in A's dtype, kept in fp64)
    torch.testing.assert_close(G, A.double().T @ B.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(add_gram(G, A, B, placement=placement), 2 * A.double().T @ B.double(),
                               rtol=1e-5, atol=1e-5)


def test_a_wide_gram_formed_by_blocks_is_symmetric_and_exact():
    A = torch.randn(8, SYMMETRIC_MIN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G = add_gram(None, A)
    torch.testing.assert_close(G, A.T @ A)
    step = SYMMETRIC_MIN // SYMMETRIC_BLOCKS  # the blocks right of the first column block are mirrored exactly
    assert torch.equal(G[:step, step:], G[step:, :step].T)


def test_add_ridge_adds_a_share_of_the_mean_diagonal():
    G = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert add_ridge(G, 0.5).item() == 1.0 and G.diagonal().tolist() == [2.0, 4.0]


def test_first_bad_value_finds_nan_and_inf():
    t = torch.zeros(1000)
    assert first_bad_value(t) is None and first_bad_value(torch.arange(5)) is None
    t[700] = float("inf")
    assert first_bad_value(t) == "Inf"
    t[3] = float("nan")
    assert first_bad_value(t) == "NaN" and first_bad_value(t.view(10, 100).bfloat16()) == "NaN"
    assert first_bad_value(torch.tensor([float("-inf")])) == "Inf"


def test_held_out_ridge_leans_on_the_weights_when_few_tokens_fit_them_and_not_when_many_do():
    I, g = 48, torch.Generator().manual_seed(3)
    mix = torch.randn(I, I, generator=g, dtype=torch.float64) / I ** 0.5 + torch.eye(I, dtype=torch.float64)
    W = torch.randn(8, I, generator=g, dtype=torch.float64)
    keep = torch.arange(0, I, 2)

    def chosen(n_fit: int) -> float:
        fit, other = (torch.randn(n, I, generator=g, dtype=torch.float64) @ mix for n in (n_fit, 2000))
        return held_out_refit(fit.T @ fit, W, keep, other)[0]

    few, many = chosen(30), chosen(20000)
    assert many <= RIDGE < few
    assert few in [RIDGE * RIDGE_STEP ** k for k in range(-2, 5)]


def test_ridges_come_back_from_json_and_default_to_the_fixed_ridge():
    assert Ridges.from_json(Ridges(0.1, 0.03).as_json()) == Ridges(0.1, 0.03)
    assert Ridges.from_json(None) == Ridges() == Ridges(RIDGE, RIDGE)
