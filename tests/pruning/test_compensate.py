"""compensate.py: least-squares compensation lowers the reconstruction error and leaves an uncut
block alone; mean compensation (FLAP's) puts exactly the removed units' mean output into the
biases, checked against a block computed by hand; the COMPENSATIONS table matches the CLI's."""

import numpy as np
import pytest
import torch

from streamprune import config
from streamprune.arch.spec import BlockSpec
from streamprune.pruning.block import block_forward
from streamprune.pruning.compensate import COMPENSATIONS, compensate, restore_means
from streamprune.pruning.scoring import Calibration
from streamprune.pruning.selection import Kept, select_units, uniform_sizes
from streamprune.pruning.slicing import slice_block
from tests.models import block_calibration, random_block

SPEC = BlockSpec(hidden=32, n_heads=8, n_kv=4, head_dim=4, intermediate=48, eps=1e-5)


def cut(W, spec, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    kept = select_units(torch.rand(spec.n_heads, generator=g), torch.rand(spec.intermediate, generator=g), spec,
                        uniform_sizes(spec, sparsity))
    return (kept, *slice_block(W, spec, kept))


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_least_squares_lowers_the_reconstruction_error(sparsity):
    W, calib = random_block(SPEC), block_calibration(SPEC)
    kept, W_new, spec_new = cut(W, SPEC, sparsity)
    W_comp = compensate(W, SPEC, W_new, spec_new, kept, calib)

    def error(Wp):
        return sum((block_forward(Wp, spec_new, x, calib.cos, calib.sin)
                    - block_forward(W, SPEC, x, calib.cos, calib.sin)).pow(2).sum() for x in calib.batches())

    assert error(W_comp) < 0.8 * error(W_new)
    assert set(W_comp) == set(W_new) and all(W_comp[k].shape == W_new[k].shape for k in W_new)
    assert COMPENSATIONS["lsq"].apply(W, SPEC, W_new, spec_new, kept, calib, frozenset()).keys() == W_comp.keys()


def test_least_squares_leaves_an_unpruned_block_alone():
    W, calib = random_block(SPEC), block_calibration(SPEC)
    kept, W_new, spec_new = cut(W, SPEC, 0.0)
    W_comp = compensate(W, SPEC, W_new, spec_new, kept, calib)
    assert all(torch.equal(W_comp[k], W[k]) for k in W)


# ---- mean compensation on a block small enough to compute by hand ----
# hidden 4, 2 heads of dim 2 (2 KV heads), 3 neurons; norms 1 and eps 0; q = k = 0, so every
# query scores every key 0 and a token's head output is the plain average of the values up to it;
# the rotary tables are the identity. Head 1 and neuron 1 are removed.

HAND = BlockSpec(hidden=4, n_heads=2, n_kv=2, head_dim=2, intermediate=3, eps=0.0)
V = [[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, -0.5], [0.5, -1.0, 1.0, 0.0], [0.0, 0.5, 0.0, 2.0]]
O = [[1.0, 0.0, 0.3, 0.5], [0.0, 1.0, -0.5, 0.0], [0.2, 0.0, 1.0, -1.0], [0.5, 0.0, 0.0, 1.0]]
GATE = [[1.0, -1.0, 0.0, 0.5], [0.5, 0.5, 1.0, 0.0], [0.0, 1.0, -0.5, 1.0]]
UP = [[0.5, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, -1.0], [0.0, -0.5, 0.5, 1.0]]
DOWN = [[1.0, 0.5, 0.0], [0.0, -2.0, 1.0], [0.5, 1.5, 0.0], [0.0, 0.25, -1.0]]
X = [[[1, 2, 0, -1], [0, 1, -2, 1]],  # 3 windows of 2 tokens; micro-batches of 2 and 1 windows
     [[2, -1, 1, 0], [1, 1, 1, 1]],
     [[-1, 0, 3, 1], [0, -2, 1, 2]]]
O_BIAS = [0.1, -0.2, 0.3, 0.0]


def hand_block(o_bias: bool) -> dict[str, torch.Tensor]:
    def t(rows):
        return torch.tensor(rows, dtype=torch.float32)

    W = {"attn_norm": torch.ones(4), "mlp_norm": torch.ones(4), "q": torch.zeros(4, 4), "k": torch.zeros(4, 4),
         "v": t(V), "o": t(O), "gate": t(GATE), "up": t(UP), "down": t(DOWN)}
    if o_bias:
        W["o_bias"] = t(O_BIAS)
    return W


def hand_calibration() -> Calibration:
    x = torch.tensor(X, dtype=torch.float32)
    return Calibration(lambda: iter(x.split(2)), torch.ones(2, 2), torch.zeros(2, 2), torch.Generator(), 3)


def by_hand(o_bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """The mean outputs of head 1 through o_proj and of neuron 1 through down_proj, in numpy."""
    x = np.array(X, dtype=np.float64)  # (3 windows, 2 tokens, 4)
    V_, O_, G_, U_, D_ = (np.array(m, dtype=np.float64) for m in (V, O, GATE, UP, DOWN))

    def norm(v):  # RMSNorm, weight 1, eps 0
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True))

    values = norm(x) @ V_.T  # (3, 2, 4): head 0's value is [:2], head 1's is [2:]
    heads = np.stack([values[:, 0], (values[:, 0] + values[:, 1]) / 2], axis=1)  # token t averages tokens 0..t
    h = x + heads @ O_.T + (np.array(O_BIAS) if o_bias else 0)
    z = norm(h)
    gate = z @ G_.T
    act = gate / (1 + np.exp(-gate)) * (z @ U_.T)  # silu(gate) * up, (3, 2, 3)
    tokens = 3 * 2
    head1_mean = heads[:, :, 2:].sum((0, 1)) / tokens  # head 1's output, (2,)
    neuron1_mean = act[:, :, 1].sum() / tokens
    return O_[:, 2:] @ head1_mean, D_[:, 1] * neuron1_mean


HAND_KEPT = Kept(heads=torch.tensor([0]), kv=torch.tensor([0]), neurons=torch.tensor([0, 2]))


@pytest.mark.parametrize("o_bias", [False, True])
def test_mean_compensation_adds_the_removed_units_mean_output(o_bias):
    spec = HAND if not o_bias else BlockSpec(**{**HAND.__dict__, "o_bias": True})
    W, calib = hand_block(o_bias), hand_calibration()
    W_new, spec_new = slice_block(W, spec, HAND_KEPT)
    assert (spec_new.n_heads, spec_new.intermediate) == (1, 2)
    out = COMPENSATIONS["mean"].apply(W, spec, W_new, spec_new, HAND_KEPT, calib, frozenset({"attention", "mlp"}))
    attention_shift, mlp_shift = by_hand(o_bias)
    assert attention_shift.any() and mlp_shift.any()  # the case is not trivial
    expected_o_bias = attention_shift + (np.array(O_BIAS) if o_bias else 0)
    np.testing.assert_allclose(out["o_bias"].double().numpy(), expected_o_bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["down_bias"].double().numpy(), mlp_shift, rtol=1e-5, atol=1e-6)
    assert out["o_bias"].dtype == out["down_bias"].dtype == torch.float32
    assert all(torch.equal(out[k], W_new[k]) for k in W_new if k != "o_bias")  # nothing else changes
    same = restore_means(W, spec, W_new, HAND_KEPT, calib.batches, calib.cos, calib.sin,
                         frozenset({"attention", "mlp"}))
    assert torch.equal(same["o_bias"], out["o_bias"]) and torch.equal(same["down_bias"], out["down_bias"])


def test_mean_compensation_only_where_the_output_has_a_bias_and_a_unit_went():
    W, calib = hand_block(False), hand_calibration()
    W_new, spec_new = slice_block(W, HAND, HAND_KEPT)
    mean = COMPENSATIONS["mean"]
    attention_only = mean.apply(W, HAND, W_new, spec_new, HAND_KEPT, calib, frozenset({"attention"}))  # Qwen3
    assert "o_bias" in attention_only and "down_bias" not in attention_only
    assert mean.apply(W, HAND, W_new, spec_new, HAND_KEPT, calib, frozenset()).keys() == W_new.keys()  # Mistral
    all_kept = Kept(heads=torch.tensor([0, 1]), kv=torch.tensor([0, 1]), neurons=torch.tensor([0, 1, 2]))
    W_all, spec_all = slice_block(W, HAND, all_kept)
    assert mean.apply(W, HAND, W_all, spec_all, all_kept, calib, frozenset({"attention", "mlp"})).keys() == W_all.keys()


def test_the_compensations_table():
    assert tuple(COMPENSATIONS) == config.COMPENSATIONS
    assert {name: (c.name, c.refits, c.needs_biases) for name, c in COMPENSATIONS.items()} == {
        "lsq": ("lsq", True, False), "mean": ("mean", False, True), "none": ("none", False, False)}
    W, calib = hand_block(False), hand_calibration()
    W_new, spec_new = slice_block(W, HAND, HAND_KEPT)
    assert COMPENSATIONS["none"].apply(W, HAND, W_new, spec_new, HAND_KEPT, calib, frozenset({"attention"})) is W_new


@pytest.mark.parametrize("columns", [0, 1, 5, 64])
def test_gram_in_column_blocks_equals_the_whole_product(columns):
    from streamprune.pruning.numerics import GramPlacement, add_gram
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(50, 20, generator=g), torch.randn(50, 9, generator=g)
    place = GramPlacement(host=True, columns=columns)
    G = add_gram(add_gram(None, A, placement=place), A, placement=place)
    torch.testing.assert_close(G, 2 * (A.T @ A).double(), rtol=1e-6, atol=1e-5)
    C = add_gram(None, A, B, dtype=torch.float64, placement=place)
    assert C.dtype == torch.float64 and C.shape == (20, 9)
    torch.testing.assert_close(C, (A.T @ B).double(), rtol=1e-6, atol=1e-5)
