"""shards.py on files it writes itself: the header index reads back what write_safetensors wrote
(names, dtypes, shapes, byte ranges), the writer is deterministic, rows() reads exactly the rows
asked for, copied tensors keep their bytes, and check() refuses a tensor of the wrong shape."""

import json
import struct

import pytest
import torch
from safetensors import safe_open

from streamprune.errors import StreamPruneError
from streamprune.store import shards
from streamprune.store.safetensors_header import read_header
from streamprune.store.shard_writer import OutTensor, tensor_bytes, write_safetensors
from streamprune.store.shards import ShardIndex


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(10, 3, generator=g),  # 2-D, fp32
            "a.norm": torch.randn(5, generator=g).half(),  # 1-D, fp16
            "c.cube": torch.randn(2, 3, 4, generator=g).bfloat16()}  # 3-D, bf16


def write(path, ts: dict[str, torch.Tensor]):
    write_safetensors(path, [OutTensor.of(name, t) for name, t in ts.items()])
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A one-file model folder written by write_safetensors."""
    folder = tmp_path_factory.mktemp("shards")
    write(folder / "model.safetensors", tensors())
    return folder


def test_header_round_trip(model):
    path = model / "model.safetensors"
    infos = read_header(path)
    ts = tensors()
    assert set(infos) == set(ts)
    assert {n: (i.dtype, i.shape) for n, i in infos.items()} == {
        "a.norm": ("F16", (5,)), "b.weight": ("F32", (10, 3)), "c.cube": ("BF16", (2, 3, 4))}
    # laid out in name order, back to back, from the end of the header to the end of the file
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    pos = 8 + n
    for name in sorted(infos):
        info = infos[name]
        assert info.file == path
        assert (info.start, info.nbytes) == (pos, ts[name].numel() * ts[name].element_size()), name
        assert path.read_bytes()[info.start:info.end] == tensor_bytes(ts[name]), name
        pos = info.end
    assert pos == path.stat().st_size
    header = json.loads(path.read_bytes()[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert n % 8 == 0  # padded as safetensors pads its own headers


def test_index_loads_what_was_written(model):
    index = ShardIndex.open(model)
    assert set(index.tensors) == set(tensors())
    loaded = index.load({"x": "c.cube", "y": "a.norm"})
    assert torch.equal(loaded["x"], tensors()["c.cube"]) and loaded["x"].dtype == torch.bfloat16
    assert torch.equal(loaded["y"], tensors()["a.norm"])
    assert index.load({"y": "a.norm"}, dtype=torch.float32)["y"].dtype == torch.float32
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:  # safetensors reads it too
        assert all(torch.equal(f.get_tensor(n), t) for n, t in tensors().items())


def test_writer_is_deterministic(tmp_path):
    ts = tensors()
    a = write(tmp_path / "a.safetensors", ts)
    b = write(tmp_path / "b.safetensors", dict(reversed(list(ts.items()))))  # another order, same file
    assert a.read_bytes() == b.read_bytes()
    changed = dict(ts, **{"a.norm": ts["a.norm"] + 1})
    assert write(tmp_path / "c.safetensors", changed).read_bytes() != a.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("ids", [[4], [0, 1, 2, 5, 7, 8, 9], [1, 3, 5], list(range(10))])
def test_rows_reads_the_requested_rows(model, ids):
    got = ShardIndex.open(model).rows("b.weight", torch.tensor(ids))
    assert torch.equal(got, tensors()["b.weight"][ids])


def test_copied_tensors_keep_their_bytes(model, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "COPY_CHUNK", 7)  # many chunks, the last one short
    index = ShardIndex.open(model)
    for name, t in tensors().items():
        chunks = list(index.raw_chunks(name))
        assert b"".join(chunks) == tensor_bytes(t)
        assert len(chunks) == -(-len(tensor_bytes(t)) // 7)
    copy = tmp_path / "copy.safetensors"
    write_safetensors(copy, [OutTensor.copy(name, index) for name in index.tensors])
    assert copy.read_bytes() == (model / "model.safetensors").read_bytes()
    # a copied tensor beside a new one: the copy's bytes land where the header says
    mixed = tmp_path / "mixed.safetensors"
    write_safetensors(mixed, [OutTensor.copy("b.weight", index), OutTensor.of("z", torch.arange(4.0))])
    info = read_header(mixed)["b.weight"]
    assert mixed.read_bytes()[info.start:info.end] == tensor_bytes(tensors()["b.weight"])


def test_check_refuses_a_wrong_shape_and_a_missing_tensor(model):
    index = ShardIndex.open(model)
    index.check({"b.weight": (10, 3), "a.norm": (5,)})  # right shapes (a subset): no complaint
    with pytest.raises(StreamPruneError, match=r"tensor b.weight has shape \[10, 3\], config says \[3, 10\]"):
        index.check({"b.weight": (3, 10)})
    with pytest.raises(StreamPruneError, match="missing tensor d.weight"):
        index.check({"d.weight": (1,)})
