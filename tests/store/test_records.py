"""The per-block record (store/records.py): its JSON, and the checks of a record read back."""

import json

import pytest

from streamprune.store.records import BlockRecord, Damaged, check_block_record, read_checked_json

KEYS = ["layer", "heads", "kv_heads", "neurons", "params", "kept_heads", "kept_kv_heads", "relative_error",
        "scoring", "timing"]


def record(**kw) -> BlockRecord:
    return BlockRecord(**dict(dict(layer=2, heads=[8, 4], kv_heads=[2, 2], neurons=[96, 48], params=[43200, 26112],
                                   relative_error=0.125, kept_heads=[0, 1, 4, 5], kept_kv_heads=[0, 1],
                                   scoring={"method": "perturb"}, timing={"seconds": 0.5}), **kw))


def test_as_json_key_order_and_the_dropped_flag():
    d = record().as_json()
    assert list(d) == KEYS and d["heads"] == [8, 4] and d["relative_error"] == 0.125
    dropped = record(heads=[8, 0], kv_heads=[2, 0], neurons=[96, 0], params=[43200, 0], relative_error=1.0,
                     kept_heads=[], kept_kv_heads=[], dropped=True).as_json()
    assert list(dropped) == ["layer", "dropped", *KEYS[1:]] and dropped["dropped"] is True
    assert "dropped" not in d


def damaged(r, journaled=False) -> str:
    with pytest.raises(Damaged) as e:
        check_block_record(r, "block 2", journaled)
    return str(e.value)


def test_check_block_record_accepts_a_real_record_and_refuses_a_damaged_one():
    good = json.loads(json.dumps(record().as_json()))
    check_block_record(good, "block 2")
    check_block_record(good, "block 2", journaled=True)
    dropped = record(heads=[8, 0], kv_heads=[2, 0], neurons=[96, 0], params=[43200, 0], dropped=True).as_json()
    check_block_record(dropped, "block 2", journaled=True)
    assert damaged(dict(good, heads=[8, 4, 2])) == "block 2['heads'] has 3 entries, not 2 (before, after)"
    assert damaged(dict(good, neurons=[96, True])) == "block 2['neurons'] entry is a boolean, not an integer"
    assert damaged(dict(good, params=[1.5, 1])) == "block 2['params'] entry is a number, not an integer"
    assert damaged(dict(good, kv_heads=[2, -1])) == "block 2['kv_heads'] has -1"
    assert damaged(dict(good, relative_error=False)) == "block 2['relative_error'] is a boolean, not a number"
    assert damaged({k: v for k, v in good.items() if k != "params"}) == "block 2 has no 'params'"
    assert damaged(dict(good, kept_heads=[0, "1"])) == "block 2['kept_heads'] entry is a string, not an integer"
    assert damaged(dict(good, heads=[70000, 1])) == "block 2 has 70000 heads"
    assert damaged([good]) == "block 2 is an array, not an object"


def test_a_journaled_record_also_needs_its_timing():
    report_record = {k: v for k, v in record().as_json().items() if k != "timing"}
    check_block_record(report_record, "block 2")  # report.json's blocks have none
    assert damaged(report_record, journaled=True) == "block 2 has no 'timing'"
    assert damaged(dict(report_record, timing=[]), journaled=True) == "block 2['timing'] is an array, not an object"


def test_read_checked_json_says_what_is_wrong(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record().as_json()))
    assert read_checked_json(path, lambda r: check_block_record(r, "block 2")) == (record().as_json(), None)
    path.write_text(json.dumps(dict(record().as_json(), heads=[8])))
    assert read_checked_json(path, lambda r: check_block_record(r, "block 2")) == \
        (None, "block 2['heads'] has 1 entries, not 2 (before, after)")
    path.write_bytes(b"\xff{")
    assert read_checked_json(path, lambda r: None) == (None, "not UTF-8 text")
    path.write_text("{")
    assert read_checked_json(path, lambda r: None)[1].startswith("not valid JSON: ")
