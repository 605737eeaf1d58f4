"""One dense block per block: the perturb scorer's passes measure what least-squares compensation
needs (o_proj's refit from the head outputs' Gram, down_proj's equations over all neurons), and the
dense outputs are kept between passes. Each shortcut must give what the long way gives: the
compensated weights against compensate() on its own passes, the output bytes of a run against a
run that keeps no dense outputs."""

import dataclasses
from pathlib import Path

import pytest
import torch

from streamprune.arch.spec import BlockSpec
from streamprune.config import RunConfig
from streamprune.engine import pipeline, pruning_pass
from streamprune.pruning.compensate import compensate
from streamprune.pruning.numerics import NormalEquations, add_gram
from streamprune.pruning.scoring import ScoringOptions, make_scorer
from streamprune.pruning.scoring.base import TargetKeeper, Targets
from streamprune.pruning.selection import select_units
from streamprune.pruning.slicing import slice_block
from tests.models import block_calibration, random_block, save_tiny_model

DEMO = Path(__file__).resolve().parents[2] / "demo"
SPEC = BlockSpec(hidden=32, n_heads=8, n_kv=4, head_dim=4, intermediate=48, eps=1e-5)


class InMemoryTargets(Targets):
    """Kept dense outputs in a list (the pruning pass keeps them in the activation cache)."""

    def __init__(self):
        self.ready, self.kept, self.reads = False, [], 0

    def keeper(self):
        targets = self

        class Keep(TargetKeeper):
            def add(self, y):
                targets.kept.append(y.clone())

            def done(self):
                targets.ready = True
        return Keep()

    def batches(self):
        self.reads += 1
        yield from self.kept


def scored_and_compensated(sizes, calib):
    W = random_block(SPEC)
    scores = make_scorer("perturb", ScoringOptions(sizes=sizes, budget=0.5)).score(W, SPEC, calib)
    kept = select_units(scores.heads, scores.neurons, SPEC, sizes)
    W_new, spec_new = slice_block(W, SPEC, kept)
    return W, kept, W_new, spec_new, compensate(W, SPEC, W_new, spec_new, kept, calib)


def sizes_of(n_kv, group, intermediate):
    from streamprune.pruning.selection import Sizes
    return Sizes(n_kv, group, intermediate)


@pytest.mark.slow
def test_compensation_from_the_scorers_passes_equals_its_own_passes():
    # both, heads, both, neurons
    for sizes in (sizes_of(3, 2, 30), sizes_of(2, 2, 48), sizes_of(4, 1, 20), sizes_of(4, 2, 24)):
        calib = block_calibration(SPEC)
        calib.targets = InMemoryTargets()
        W, kept, W_new, spec_new, shared = scored_and_compensated(sizes, calib)
        assert calib.shared and calib.targets.ready  # the scorer measured it; the dense outputs were kept
        alone = compensate(W, SPEC, W_new, spec_new, kept, block_calibration(SPEC))  # no shared, no targets
        for k in alone:
            assert torch.allclose(shared[k], alone[k], rtol=1e-4, atol=1e-5), (sizes, k)


@pytest.mark.slow
def test_the_dense_outputs_kept_are_the_dense_block_outputs():
    from streamprune.pruning.block import block_forward
    calib = block_calibration(SPEC)
    calib.targets = InMemoryTargets()
    scored_and_compensated(sizes_of(3, 2, 30), calib)
    for x, y in zip(calib.batches(), calib.targets.kept):
        assert torch.allclose(y, block_forward(random_block(SPEC), SPEC, x, calib.cos, calib.sin), atol=1e-6)
    assert calib.targets.reads >= 1  # the later pass read them back


def test_shared_equations_restricted_equal_the_equations_of_the_subset():
    g = torch.Generator().manual_seed(0)
    A, Y, s = torch.randn(200, 12, generator=g), torch.randn(200, 5, generator=g), torch.rand(200, generator=g) + 0.5
    full = NormalEquations()
    full.add(A, Y, s)
    part = NormalEquations()
    keep = torch.tensor([0, 3, 4, 9, 11])
    part.add(A[:, keep], Y, s)
    W0 = torch.randn(5, 5, generator=g)
    assert torch.allclose(full.restricted(keep).solve(W0, 0.01), part.solve(W0, 0.01), atol=1e-10)


def test_wide_gram_from_its_lower_triangle_is_the_full_product():
    A = torch.randn(300, 700, generator=torch.Generator().manual_seed(1))
    G = add_gram(add_gram(None, A), A)
    assert torch.equal(G, G.T)
    assert torch.allclose(G, 2 * (A.double().T @ A.double()), rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_keeping_the_dense_outputs_changes_no_output_byte(tmp_path, monkeypatch):
    src = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=DEMO / "stories260K")
    cfg = RunConfig(shards=src, out=tmp_path / "kept", sparsity=0.4, calib=DEMO / "calib.txt", samples=4,
                    seq_len=16, batch_size=2, progress=False)
    pipeline.run(cfg)
    files = sorted(p.name for p in (tmp_path / "kept").glob("model-*.safetensors"))
    monkeypatch.setattr(pruning_pass, "KeptTargets", lambda *args: None)  # every pass runs the dense block
    pipeline.run(dataclasses.replace(cfg, out=tmp_path / "computed"))
    for name in files:
        assert (tmp_path / "kept" / name).read_bytes() == (tmp_path / "computed" / name).read_bytes(), name


@pytest.mark.slow
def test_blocks_resident_between_passes_change_no_output_byte_and_read_each_block_once(tmp_path, monkeypatch):
    """What a GPU with room does (plan.Plan.resident_bytes; forced here on the CPU): the same bytes,
    a block's inputs read from the cache once per walk (block 0's embeddings) instead of once a pass."""
    from streamprune.engine.context import RunContext
    from streamprune.store.cache import ActivationCache
    src = save_tiny_model(tmp_path / "in", "llama", layers=3, vocab=512, tokenizer_from=DEMO / "stories260K")
    cfg = RunConfig(shards=src, out=tmp_path / "read", sparsity=0.4, calib=DEMO / "calib.txt", samples=4,
                    seq_len=16, batch_size=2, progress=False)
    reads, real_batch = [], ActivationCache.batch

    def batch(self, block, *args, **kwargs):  # (the survey's probe streams are files of their own)
        if kwargs.get("kind", args[4] if len(args) > 4 else "inputs") != "probes":
            reads.append(block)
        return real_batch(self, block, *args, **kwargs)
    monkeypatch.setattr(ActivationCache, "batch", batch)
    pipeline.run(cfg)
    read_each_pass = len(reads)
    reads.clear()
    build = RunContext.build.__func__
    monkeypatch.setattr(RunContext, "build", classmethod(lambda cls, *a, **k: build(cls, *a, **dict(k, resident=True))))
    pipeline.run(dataclasses.replace(cfg, out=tmp_path / "resident"))
    assert set(reads) == {0} and len(reads) < read_each_pass / 4, (reads, read_each_pass)
    for p in sorted((tmp_path / "read").glob("model-*.safetensors")):
        assert p.read_bytes() == (tmp_path / "resident" / p.name).read_bytes(), p.name


@pytest.mark.parametrize("sizes", [sizes_of(3, 2, 30), sizes_of(4, 2, 24), sizes_of(2, 2, 48)])
def test_what_the_last_mlp_pass_kept_gives_the_cut_blocks_output(sizes):
    """scoring.base.KeptMlp: the residual and activations of the last pass over the MLP (the
    scorer's, or compensation's behind the refit o_proj), with down_proj applied, are the sliced and
    compensated block's output; behind other heads, or over other neurons, they are not offered."""
    from streamprune.pruning.block import block_forward
    from streamprune.pruning.scoring.base import KeptMlp
    calib = block_calibration(SPEC)
    calib.mlp = KeptMlp()
    W, kept, W_new, spec_new, compensated = scored_and_compensated(sizes, calib)
    parts = calib.mlp.behind(W, compensated, kept.heads, kept.neurons, 4)
    assert parts is not None
    for x, (h, a) in zip(calib.batches(), parts):
        y = h + torch.nn.functional.linear(a, compensated["down"], compensated.get("down_bias"))
        assert torch.allclose(y, block_forward(compensated, spec_new, x, calib.cos, calib.sin), atol=1e-5)
    assert calib.mlp.behind(W, compensated, kept.heads, kept.neurons, 5) is None  # other micro-batches
    other = kept.neurons[:-1] if calib.mlp.neurons is not None else None
    if other is not None:
        assert calib.mlp.behind(W, compensated, kept.heads, other, 4) is None
    if calib.mlp.heads is not None:
        assert calib.mlp.behind(W, dict(compensated, o=compensated["o"] * 2), kept.heads, kept.neurons, 4) is None


@pytest.mark.slow
def test_an_output_pass_from_the_kept_mlp_activations_gives_the_same_model(tmp_path, monkeypatch):
    """The output pass takes the last MLP pass's activations where the plan has room (pinned in the
    journal): it runs no cut block, and the model it writes is the one the cut block's forward gives
    (to float rounding)."""
    from safetensors.torch import load_file

    from streamprune.planning import plan
    src = save_tiny_model(tmp_path / "in", "llama", layers=3, vocab=512, tokenizer_from=DEMO / "stories260K")
    cfg = RunConfig(shards=src, out=tmp_path / "kept", sparsity=0.4, calib=DEMO / "calib.txt", samples=4,
                    seq_len=16, batch_size=2, progress=False)
    forwards, real = [], pruning_pass.block_forward
    monkeypatch.setattr(pruning_pass, "block_forward", lambda *a: forwards.append(1) or real(*a))
    pipeline.run(cfg)
    assert '"keep_mlp": true' in (tmp_path / "kept" / ".streamprune" / "journal.json").read_text()
    assert forwards == []  # (the dense outputs were kept, the cut block's came from the kept activations)
    real_plan = plan.make_plan
    monkeypatch.setattr(plan, "make_plan", lambda *a, **k: dataclasses.replace(real_plan(*a, **k), keep_mlp_bytes=0))
    pipeline.run(dataclasses.replace(cfg, out=tmp_path / "forward"))
    assert len(forwards) == 3 * 2  # the cut block's forward on each micro-batch of each block
    for p in sorted((tmp_path / "kept").glob("model-*.safetensors")):
        a, b = load_file(p), load_file(tmp_path / "forward" / p.name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), p.name
