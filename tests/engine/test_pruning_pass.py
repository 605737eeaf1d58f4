"""The pruning pass (engine/pruning_pass.py) through real runs of a tiny model: the per-block
records it journals and reports, a block kept whole, a block dropped."""

import dataclasses
import json

import pytest

from streamprune.config import RunConfig
from streamprune.engine import pipeline
from streamprune.store.records import BlockRecord, check_block_record
from streamprune.store.safetensors_header import read_header
from streamprune.store.shard_writer import shard_name
from tests.models import TINYSTORIES, save_tiny_model

LAYERS = 3
RECORD_KEYS = [f.name for f in dataclasses.fields(BlockRecord) if f.name != "dropped"]


def run(tmp_path, **kw):
    src = save_tiny_model(tmp_path / "in", "llama", layers=LAYERS, vocab=512,
                          tokenizer_from=TINYSTORIES / "stories260K")
    out = tmp_path / "out"
    report = pipeline.run(RunConfig(shards=src, out=out, calib=TINYSTORIES / "calib.txt", samples=4, seq_len=32,
                                    progress=False, **kw))
    journal = json.loads((out / ".streamprune" / "journal.json").read_text())
    return report, [journal["blocks"][str(i)] for i in range(LAYERS)], out


@pytest.mark.slow
def test_sparsity_zero_keeps_every_unit_with_no_error(tmp_path):
    report, records, _ = run(tmp_path, sparsity=0.0)
    for i, r in enumerate(records):
        check_block_record(r, f"block {i}", journaled=True)
        assert set(r) == set(RECORD_KEYS) and "dropped" not in r
        assert r["layer"] == i and r["heads"] == [8, 8] and r["kv_heads"] == [2, 2] and r["neurons"] == [96, 96]
        assert r["params"][0] == r["params"][1] > 0
        assert r["kept_heads"] == list(range(8)) and r["kept_kv_heads"] == [0, 1]
        assert 0 <= r["relative_error"] < 1e-10
        assert {"score_seconds", "forward_seconds", "read_seconds", "write_seconds", "seconds"} <= set(r["timing"])
    # report.json's blocks are the journal's records without their timing
    assert report["blocks"] == [{k: v for k, v in r.items() if k != "timing"} for r in records]


@pytest.mark.slow
def test_a_pruned_and_a_dropped_blocks_records(tmp_path, monkeypatch):
    real = pipeline.allocate

    def drop_block_1(*args, **kw):
        sizes = real(*args, **kw)
        sizes[1] = None
        return sizes

    monkeypatch.setattr(pipeline, "allocate", drop_block_1)
    report, records, out = run(tmp_path, sparsity=0.3)
    kept, dropped = records[0], records[1]
    check_block_record(kept, "block 0", journaled=True)
    assert kept["heads"][1] == len(kept["kept_heads"]) < 8 or kept["neurons"][1] < 96
    assert kept["kept_heads"] == sorted(kept["kept_heads"]) and 0 < kept["relative_error"] < 1
    assert kept["params"][1] < kept["params"][0]

    check_block_record(dropped, "block 1", journaled=True)
    assert set(dropped) == {*RECORD_KEYS, "dropped"} and dropped["dropped"] is True
    assert dropped["heads"] == [8, 0] and dropped["kv_heads"] == [2, 0] and dropped["neurons"] == [96, 0]
    assert dropped["params"][1] == 0 and dropped["relative_error"] == 1.0
    assert dropped["kept_heads"] == [] and dropped["timing"]["score_seconds"] == 0.0
    assert read_header(out / shard_name(2, LAYERS + 1)) == {}  # its shard holds no tensor
    assert report["blocks"][1]["dropped"] and "dropped" not in report["blocks"][0]
    assert report["plan"]["dropped_blocks"] == [1]
