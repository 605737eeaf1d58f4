"""cache.py: activations round-trip through the memory-mapped cache in fp32 (or exactly in the
compute dtype, bf16 or fp16, in half the bytes), whatever the micro-batches and host chunks; a
cache folder belongs to one run, which deletes only the files it writes and never a user's."""

import json
from pathlib import Path

import pytest
import torch

from streamprune.errors import StreamPruneError
from streamprune.store import cache as cache_module
from streamprune.store.cache import (
    OWNER_MARK,
    ActivationCache,
    cache_owner,
    check_cache_folder,
    chunk_rows,
    run_cache_folder,
)

SAMPLES, SEQ, HIDDEN = 5, 3, 4
SAMPLE_BYTES = SEQ * HIDDEN * 4


def activations(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SAMPLES, SEQ, HIDDEN, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("chunk_samples", [1, 2, 100])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_round_trip_across_micro_batches_and_chunks(tmp_path, monkeypatch, chunk_samples, batch):
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", chunk_samples * SAMPLE_BYTES)
    assert chunk_rows((SAMPLES, SEQ, HIDDEN)) == chunk_samples
    x, cache = activations(), ActivationCache(tmp_path / "c", SAMPLES, SEQ, HIDDEN)
    writer = cache.writer(3)
    for start in range(0, SAMPLES, batch):
        writer.write(start, x[start:start + batch])
    assert not cache.has(3)  # nothing under the final name until commit
    assert (tmp_path / "c" / "inputs-00003.f32.tmp").is_file()
    writer.commit()
    assert cache.has(3) and not (tmp_path / "c" / "inputs-00003.f32.tmp").exists()
    assert cache.path(3).stat().st_size == cache.nbytes == SAMPLES * SAMPLE_BYTES
    assert torch.equal(cache.batch(3, 0, SAMPLES), x)
    for start in range(0, SAMPLES, batch):
        got = cache.batch(3, start, start + batch)
        assert got.dtype == torch.float32 and torch.equal(got, x[start:start + batch])


def test_chunk_rows_is_at_least_one(monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 1)
    assert chunk_rows((SAMPLES, SEQ, HIDDEN)) == 1
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 2 * SAMPLE_BYTES + 1)
    assert chunk_rows((SAMPLES, SEQ, HIDDEN)) == 2


def test_half_precision_inputs_are_stored_in_fp32(tmp_path):
    x, cache = activations(torch.bfloat16), ActivationCache(tmp_path, SAMPLES, SEQ, HIDDEN)
    writer = cache.writer(0)
    writer.write(0, x)
    writer.commit()
    assert torch.equal(cache.batch(0, 0, SAMPLES), x.float())
    assert cache.batch(0, 1, 3, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cache_in_the_compute_dtype_keeps_its_values_exactly_in_half_the_bytes(tmp_path, dtype):
    x, cache = activations(dtype), ActivationCache(tmp_path / "c", SAMPLES, SEQ, HIDDEN, dtype)
    writer = cache.writer(2)
    writer.write(0, x[:2])
    writer.write(2, x[2:])
    writer.commit()
    suffix = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    assert cache.path(2).name == f"inputs-00002.{suffix}" and cache.has(2)
    assert cache.path(2).stat().st_size == cache.nbytes == SAMPLES * SAMPLE_BYTES // 2
    assert torch.equal(cache.batch(2, 0, SAMPLES, dtype=dtype), x)  # the values the compute dtype has, exactly
    assert torch.equal(cache.batch(2, 1, 4), x[1:4].float())
    (tmp_path / "c" / "mine.txt").write_text("a user's")
    cache.remove_contents()  # its own files, in any dtype; never a user's
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["mine.txt"]


def test_has_and_drop(tmp_path):
    cache = ActivationCache(tmp_path, SAMPLES, SEQ, HIDDEN)
    assert not cache.has(0)
    cache.path(0).write_bytes(b"\0" * (cache.nbytes - 4))  # a file of the wrong size is not the inputs
    assert not cache.has(0)
    writer = cache.writer(0)
    writer.write(0, activations())
    writer.commit()
    assert cache.has(0) and not cache.has(1)
    cache.drop(0)
    assert not cache.has(0) and not cache.path(0).exists()
    cache.drop(0)  # dropping what is gone is fine


def test_a_blocks_kept_dense_outputs_are_a_file_beside_its_inputs_and_go_with_them(tmp_path):
    x, cache = activations(), ActivationCache(tmp_path / "c", SAMPLES, SEQ, HIDDEN)
    for kind in ("inputs", "targets"):
        writer = cache.writer(4, kind)
        writer.write(0, x if kind == "inputs" else 2 * x)
        writer.commit(durable=kind == "inputs")
    assert cache.path(4, "targets").name == "targets-00004.f32"
    assert torch.equal(cache.batch(4, 1, 3, kind="targets"), 2 * x[1:3]) and torch.equal(cache.batch(4, 1, 3), x[1:3])
    cache.drop(4)
    assert not list((tmp_path / "c").iterdir())


def own_and_foreign_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Files a run writes into its cache folder, and files it must never touch."""
    (folder / "streamprune-eval-123").mkdir()
    (folder / "streamprune-eval-123" / "inputs-00000.f32").write_bytes(b"x")
    own = [folder / "inputs-00000.f32", folder / "inputs-00007.f32.tmp", folder / "targets-00002.f32",
           folder / "targets-00003.f32.tmp", folder / "streamprune-eval-123"]
    (folder / "user-folder").mkdir()
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (folder / "streamprune-eval-link").symlink_to(elsewhere)  # a link is not followed into
    foreign = [folder / "notes.txt", folder / "inputs-1.f32", folder / "inputs-00002.f32.bak",
               folder / "inputs-00003.f32.tmp.old", folder / "user-folder", folder / "streamprune-eval-link",
               elsewhere / "keep.txt"]
    for p in own[:4] + foreign[:4]:
        p.write_bytes(b"data")
    return own, foreign


def test_claim_marks_the_folder_and_wipes_only_its_own_files_when_the_run_changes(tmp_path):
    folder, out = tmp_path / "cache", tmp_path / "out"
    ActivationCache.claim(folder, out, "run-a", SAMPLES, SEQ, HIDDEN)
    assert json.loads((folder / OWNER_MARK).read_text()) == {"out": str(out.resolve()), "run": "run-a"}
    own, foreign = own_and_foreign_files(folder)

    ActivationCache.claim(folder, out, "run-a", SAMPLES, SEQ, HIDDEN)  # the same run resumes: all kept
    assert all(p.exists() for p in own + foreign)

    cache = ActivationCache.claim(folder, out, "run-b", SAMPLES, SEQ, HIDDEN)  # a new run: its files go
    assert cache.folder == folder
    assert not any(p.exists() for p in own)
    assert all(p.exists() or p.is_symlink() for p in foreign), [p for p in foreign if not p.exists()]
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"
    assert cache_owner(folder) == {"out": str(out.resolve()), "run": "run-b"}


def test_claim_refuses_a_folder_that_is_not_the_runs(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StreamPruneError, match="not empty and was not made by streamprune"):
        ActivationCache.claim(folder, tmp_path / "out", "run-a", SAMPLES, SEQ, HIDDEN)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_remove_leaves_a_foreign_file_and_its_folder(tmp_path):
    folder, out = tmp_path / "cache", tmp_path / "out"
    cache = ActivationCache.claim(folder, out, "run-a", SAMPLES, SEQ, HIDDEN)
    own, foreign = own_and_foreign_files(folder)
    cache.remove()
    assert folder.is_dir() and not (folder / OWNER_MARK).exists()
    assert not any(p.exists() for p in own)
    assert all(p.exists() or p.is_symlink() for p in foreign)

    clean = ActivationCache.claim(tmp_path / "clean", out, "run-a", SAMPLES, SEQ, HIDDEN)
    writer = clean.writer(0)
    writer.write(0, activations())
    writer.commit()
    clean.remove()  # nothing but its own files: the folder goes too
    assert not (tmp_path / "clean").exists()
    clean.remove()  # and removing it again is fine


def test_run_cache_folder(tmp_path):
    work = tmp_path / "out" / ".streamprune"
    assert run_cache_folder(tmp_path / "out", work, None) == work / "cache"
    shared = tmp_path / "scratch"
    a = run_cache_folder(tmp_path / "out-a", tmp_path / "out-a" / ".streamprune", shared)
    b = run_cache_folder(tmp_path / "out-b", tmp_path / "out-b" / ".streamprune", shared)
    assert a.parent == b.parent == shared and a != b
    assert a.name.startswith("streamprune-cache-")
    assert run_cache_folder(tmp_path / "x" / ".." / "out-a", work, shared) == a  # the same output, spelled otherwise


def test_check_cache_folder(tmp_path):
    out = tmp_path / "out"
    check_cache_folder(tmp_path / "new", out)  # not there yet
    (tmp_path / "empty").mkdir()
    check_cache_folder(tmp_path / "empty", out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StreamPruneError, match="exists and is not a folder"):
        check_cache_folder(tmp_path / "file", out)
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.bin").write_bytes(b"1")
    with pytest.raises(StreamPruneError, match="not empty and was not made by streamprune"):
        check_cache_folder(user, out)
    (user / OWNER_MARK).write_text("[1, 2]")  # a mark that is not an object is no mark
    with pytest.raises(StreamPruneError, match="not made by streamprune"):
        check_cache_folder(user, out)
    ActivationCache.claim(tmp_path / "theirs", tmp_path / "other-out", "r", SAMPLES, SEQ, HIDDEN)
    with pytest.raises(StreamPruneError, match="belongs to the run into"):
        check_cache_folder(tmp_path / "theirs", out)
    check_cache_folder(tmp_path / "theirs", tmp_path / "other-out")


def test_a_run_caches_in_the_dtype_its_blocks_compute_in(tmp_path):
    from streamprune.arch.model import model_compute_dtype, open_model
    from tests.models import save_tiny_model
    model = open_model(save_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16))
    assert model_compute_dtype(model, torch.device("cpu")) == torch.float32  # a CPU computes in fp32
    assert model_compute_dtype(model, torch.device("cuda")) == torch.bfloat16  # a GPU in the model's dtype
