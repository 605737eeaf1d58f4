"""fsutil: a write lands whole under its final name or not at all; a full disk is one clear error;
temporaries a killed run left are swept."""

import errno
import json

import pytest

from streamprune.errors import StreamPruneError
from streamprune.store.fsutil import (
    TMP_SUFFIX,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    remove_temporaries,
    write_kind,
)


def test_bytes_and_json_land_under_the_final_name_only(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"x" * 1001)
    atomic_write_json(tmp_path / "b.json", {"z": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"x" * 1001
    text = (tmp_path / "b.json").read_text()
    assert json.loads(text) == {"z": 1, "a": [1, 2]} and text.endswith("\n") and text.index('"a"') < text.index('"z"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "journal.json"
    atomic_write_bytes(path, b"old")

    def broken(f):
        f.write(b"half of the new")
        raise OSError(errno.EIO, "I/O error")
    with pytest.raises(OSError, match="I/O error"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["journal.json"]


def test_a_full_disk_is_one_clear_error(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(StreamPruneError, match=r"no space left on device while writing .*shard\.safetensors; .*re-run"):
        atomic_write(tmp_path / "shard.safetensors", full)
    assert list(tmp_path.iterdir()) == []


def test_an_error_that_is_not_an_os_error_passes_through(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "f", lambda f: 1 / 0)
    assert not (tmp_path / "f").exists()


def test_remove_temporaries_sweeps_only_temporaries(tmp_path):
    (tmp_path / ("model.safetensors" + TMP_SUFFIX)).write_bytes(b"partial")
    (tmp_path / "model.safetensors").write_bytes(b"whole")
    (tmp_path / "notes.txt").write_text("keep")
    remove_temporaries(tmp_path)
    remove_temporaries(tmp_path / "missing")  # no folder: nothing to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]


def test_write_kind_names_the_fault_points(tmp_path):
    assert [write_kind(tmp_path / n) for n in ("journal.json", "a.safetensors", "config.json")] == \
        ["journal", "shard", "file"]
