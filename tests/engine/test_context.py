"""RunContext (engine/context.py): what every stage of a run shares, and a block's Calibration."""

import torch

from streamprune.arch.families import rotary_tables
from streamprune.arch.model import open_model
from streamprune.config import RunConfig
from streamprune.engine.context import RunContext
from streamprune.engine.distributed import window_share
from streamprune.pruning.numerics import ON_DEVICE
from streamprune.pruning.ranks import SINGLE, Ranks
from streamprune.store.cache import ActivationCache
from tests.models import save_tiny_model

SAMPLES, T, BATCH = 7, 8, 2


class SecondOfTwo(Ranks):
    """Rank 1 of 2 (only its share of the windows is used here: no process group)."""

    rank, world = 1, 2


def context(tmp_path, ranks=SINGLE, seed=3):
    model = open_model(save_tiny_model(tmp_path / "in", "llama", layers=2, shard_size="10GB"))
    cfg = RunConfig(shards=model.folder, out=tmp_path / "out", samples=SAMPLES, seq_len=T, seed=seed, progress=False)
    share = window_share(ranks, SAMPLES, BATCH)
    cache = ActivationCache(tmp_path / "cache", len(share.windows), T, model.arch.hidden)
    tokens = torch.arange(SAMPLES * T).view(SAMPLES, T)
    return RunContext.build(cfg, model, cache, tokens, BATCH, ON_DEVICE, ranks, None)


def test_build_keeps_all_windows_for_one_process_and_rotary_tables_of_seq_len(tmp_path):
    ctx = context(tmp_path)
    assert torch.equal(ctx.tokens, torch.arange(SAMPLES * T).view(SAMPLES, T))
    assert ctx.share.windows == range(SAMPLES) and ctx.device == torch.device("cpu")
    cos, sin = rotary_tables(ctx.model.arch.config, T)
    assert ctx.cos.shape == (T, ctx.model.arch.blocks[0].head_dim)
    assert torch.equal(ctx.cos, cos) and torch.equal(ctx.sin, sin)
    assert ctx.stream().windows == SAMPLES and ctx.stream().batch == BATCH


def test_build_keeps_this_ranks_windows(tmp_path):
    ctx = context(tmp_path, SecondOfTwo())
    # 4 micro-batches of 2 (the last of 1) split 2 + 2: rank 1 holds windows 4..6
    assert ctx.share.windows == range(4, SAMPLES)
    assert torch.equal(ctx.tokens, torch.arange(SAMPLES * T).view(SAMPLES, T)[4:])
    assert ctx.stream().windows == 3


def test_calibration_streams_the_cached_batches_with_the_blocks_seeded_generator(tmp_path):
    ctx = context(tmp_path)
    x = torch.randn(SAMPLES, T, ctx.model.arch.hidden)
    w = ctx.cache.writer(1)
    w.write(0, x)
    w.commit()
    stream = ctx.stream()
    calib = ctx.calibration(stream, 1, torch.float32, None)
    batches = list(calib.batches())
    assert [b.shape[0] for b in batches] == [2, 2, 2, 1] and torch.equal(torch.cat(batches), x)
    assert torch.equal(torch.cat(list(calib.batches())), x)  # each call is a fresh pass
    assert calib.samples == SAMPLES and calib.cos is ctx.cos and calib.targets is None
    assert calib.batch_sizes == (2, 2, 2, 1) and calib.local == range(4)

    def draws(c):
        return torch.randint(0, 10**6, (8,), generator=c.generator)

    again = ctx.calibration(stream, 1, torch.float32, None)
    assert torch.equal(draws(calib), draws(again))  # the same stream on two calls (a resumed run redraws it)
    assert not torch.equal(draws(ctx.calibration(stream, 0, torch.float32, None)),
                           draws(ctx.calibration(stream, 1, torch.float32, None)))  # its own per block
    other_seed = context(tmp_path / "seed", seed=4)
    assert not torch.equal(draws(other_seed.calibration(other_seed.stream(), 1, torch.float32, None)),
                           draws(ctx.calibration(stream, 1, torch.float32, None)))
