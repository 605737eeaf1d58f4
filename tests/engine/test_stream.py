"""BlockStream (engine/stream.py): the one walk over the blocks, on a tiny model and a real
activation cache."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamprune.arch.model import open_model
from streamprune.engine.stream import BlockStream, progress_bar
from streamprune.errors import StreamPruneError
from streamprune.store.cache import ActivationCache
from tests.models import save_tiny_model

WINDOWS, T = 5, 4


@pytest.fixture
def stream(tmp_path):
    model = open_model(save_tiny_model(tmp_path / "in", "llama", layers=3, shard_size="10GB"))
    cache = ActivationCache(tmp_path / "cache", WINDOWS, T, model.arch.hidden)
    return BlockStream(model, cache, torch.device("cpu"), batch=2, windows=WINDOWS)


def cached(stream, layer, kind="inputs", scale=1.0):
    x = scale * torch.arange(WINDOWS * T * stream.model.arch.hidden, dtype=torch.float32).view(WINDOWS, T, -1)
    w = stream.cache.writer(layer, kind)
    w.write(0, x)
    w.commit()
    return x


class Bar:
    """What BlockStream uses of a tqdm bar: disable, update, set_postfix_str."""

    disable = False

    def __init__(self):
        self.n, self.postfix = 0, []

    def update(self, n):
        self.n += n

    def set_postfix_str(self, text, refresh=True):
        self.postfix.append(text)


def test_blocks_yields_start_to_the_last_and_ticks_the_bar_once_each(stream):
    bar, seen = Bar(), []
    for layer in stream.blocks(1, bar):
        seen.append((layer, bar.n))
    assert seen == [(1, 0), (2, 1)] and bar.n == 2  # each block counted once its loop body is done
    with progress_bar("test", 3, 1, progress=False) as off:
        assert list(stream.blocks(1, off)) == [1, 2]


def test_the_bar_is_tqdms_on_a_terminal_and_plain_lines_elsewhere(monkeypatch, capsys):
    from tqdm import tqdm

    from streamprune.store.runlog import PlainProgress
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with progress_bar("survey", 3, 0) as plain:
        assert isinstance(plain, PlainProgress)
    assert capsys.readouterr().err == "survey: 0/3 blocks\n"
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    with progress_bar("survey", 3, 0, progress=False) as bar:
        assert isinstance(bar, tqdm) and bar.disable


def test_micro_batches_read_show_on_the_bar(stream):
    cached(stream, 0)
    bar = Bar()
    for layer in stream.blocks(0, bar):
        if layer == 0:
            assert len(list(stream.batches(0, torch.float32))) == 3
    assert bar.postfix and bar.postfix[0] == "block 0: 1 micro-batch read"


def test_read_gives_the_stored_block_and_refuses_a_nan_weight_naming_the_tensor(stream):
    W = stream.read(1)
    assert set(W) == set(stream.model.arch.block_tensors(1))
    assert W["q"].shape == stream.model.arch.blocks[1].shapes()["q"]
    assert stream.dtype(W) == torch.float32

    name = stream.model.arch.layer_tensor(1, "down")
    path = stream.model.folder / "model.safetensors"
    tensors = load_file(path)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(StreamPruneError) as e:
        stream.read(1)
    assert str(e.value) == f"tensor {name} contains NaN values; the input model is damaged"
    assert "\n" not in str(e.value)
    stream.read(0)  # the other blocks still read


def test_batches_cover_every_window_in_micro_batches_and_targets_read_the_other_file(stream):
    x = cached(stream, 1)
    y = cached(stream, 1, "targets", scale=-1.0)
    got = list(stream.batches(1, torch.float64))
    assert [s for s, _ in got] == [0, 2, 4] and [b.shape[0] for _, b in got] == [2, 2, 1]
    assert all(b.dtype == torch.float64 for _, b in got)
    assert torch.equal(torch.cat([b for _, b in got]).float(), x)
    targets = torch.cat([b for _, b in stream.batches(1, torch.float32, "targets", tick=False)])
    assert torch.equal(targets, y)


def test_outputs_are_the_next_blocks_inputs(stream):
    x = torch.randn(WINDOWS, T, stream.model.arch.hidden)
    w = stream.outputs(1)
    w.write(0, x[:3])
    w.write(3, x[3:])
    w.commit()
    assert stream.cache.has(2) and not stream.cache.has(1)
    assert torch.equal(torch.cat([b for _, b in stream.batches(2, torch.float32)]), x)


def test_a_resident_stream_reads_a_block_once_and_keeps_what_it_writes(tmp_path):
    """BlockStream.resident: the second walk over a block's inputs (and its dense outputs) comes from
    memory, not the cache; what a block writes for the next one is kept as written; the values are
    those the cache gives back; the blocks before the one being read are let go."""
    model = open_model(save_tiny_model(tmp_path / "in", "llama", layers=3, shard_size="10GB"))
    cache = ActivationCache(tmp_path / "cache", WINDOWS, T, model.arch.hidden)
    stream = BlockStream(model, cache, torch.device("cpu"), batch=2, windows=WINDOWS, resident=True)
    x = cached(stream, 0)
    reads = []
    real = cache.batch
    cache.batch = lambda *a, **k: reads.append(a[:3]) or real(*a, **k)
    first = [b for _, b in stream.batches(0, torch.float32)]
    again = [b for _, b in stream.batches(0, torch.float32)]
    assert len(reads) == 3 and all(a is b for a, b in zip(first, again))  # read once, micro-batches of 2, 2, 1
    assert torch.equal(torch.cat(again), x)
    w = stream.outputs(0)
    for start, b in zip(range(0, WINDOWS, 2), first):
        w.write(start, 2 * b)
    w.commit()
    kept = [b for _, b in stream.batches(1, torch.float32)]
    assert len(reads) == 3 and torch.equal(torch.cat(kept), 2 * x)  # block 1's inputs: as written, no read
    assert torch.equal(cache.batch(1, 0, WINDOWS), 2 * x)  # and in the file all the same
    assert set(stream.kept) == {(1, "inputs")}  # block 0's let go
    assert [b.dtype for _, b in stream.batches(1, torch.float64)] == [torch.float64] * 3  # another dtype: read


def test_a_stream_that_is_not_resident_keeps_nothing(stream):
    cached(stream, 0)
    list(stream.batches(0, torch.float32))
    assert stream.kept == {}
