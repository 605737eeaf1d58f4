"""Data-parallel runs (streamprune/engine/distributed.py) launched with the real torchrun, 2 processes,
gloo on the CPU: the output equals the single-process one within float summation order, two runs
are byte-identical, a run resumed after a rank (or every rank) was killed is byte-identical, a
dead rank stops the job with a clear message. Tiny model, 8 windows of 32 tokens: each launch
is a few seconds, mostly imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamprune.engine.distributed import Share, batch_share, shared_micro_batch
from streamprune.engine.evaluate import perplexity
from streamprune.pruning.ranks import SINGLE
from streamprune.pruning.scoring import Calibration
from tests.harness import DEMO, blocks_done, digests, make_model, run_cli, run_torchrun

# measured on this tiny model: 0 (byte-identical) for the default run; the tolerance allows for
# a different float summation order (partial sums per rank, then an all-reduce)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("dist") / "model", layers=3)


def args(model: Path, out: Path, *extra, samples: int = 8) -> list[str]:
    return [str(a) for a in ("run", "--shards", model, "--out", out, "--calib", DEMO / "calib.txt",
                             "--samples", samples, "--seq-len", 32, "--sparsity", 0.3, "--batch-size", 2, "--quiet",
                             *extra)]


def launched(result) -> None:
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    launched(run_cli(args(model, out)))
    return out


@pytest.fixture(scope="module")
def pair(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pair") / "out"
    launched(run_torchrun(args(model, out)))
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("model-*.safetensors")) for k, v in load_file(f).items()}


def max_relative_difference(a: Path, b: Path) -> float:
    A, B = tensors(a), tensors(b)
    assert A.keys() == B.keys()
    assert all(A[k].shape == B[k].shape for k in A)
    return max(((A[k] - B[k]).abs().max() / A[k].abs().max().clamp_min(1e-30)).item() for k in A)


def kept_units(folder: Path) -> list:
    report = json.loads((folder / "report.json").read_text())
    return [(b["kept_heads"], b["neurons"]) for b in report["blocks"]]


def ppl(folder: Path) -> float:
    return perplexity(folder, DEMO / "eval.txt", seq_len=64, max_windows=8).ppl


@pytest.mark.slow
def test_two_processes_equal_one_process(single, pair):
    assert kept_units(pair) == kept_units(single)
    assert max_relative_difference(single, pair) <= TOLERANCE
    assert abs(ppl(pair) / ppl(single) - 1) <= TOLERANCE
    assert not (pair / ".streamprune" / "cache").exists() and not (pair / ".streamprune" / "cache-rank1").exists()


@pytest.mark.slow
def test_two_process_runs_are_byte_identical(model, pair, tmp_path):
    launched(run_torchrun(args(model, tmp_path / "again")))
    assert digests(tmp_path / "again") == digests(pair)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, None], ids=["rank1", "all"])
def test_resume_after_a_kill_is_byte_identical(model, pair, tmp_path, rank):
    out = tmp_path / "out"
    killed = run_torchrun(args(model, out), fault="before_journal:2", fault_rank=rank)
    assert killed.returncode != 0
    assert blocks_done(out) == 1 and not (out / "model.safetensors.index.json").exists()
    if rank == 1:  # the survivor says why it stops (unless torchrun's SIGTERM came first)
        assert "lost the other ranks" in killed.stderr or "re-run the same command" in killed.stderr
    launched(run_torchrun(args(model, out)))
    assert digests(out) == digests(pair)


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_refused(model, pair):
    before = digests(pair)
    result = run_cli(args(model, pair))
    assert result.returncode == 2 and "different arguments (processes)" in result.stderr
    assert digests(pair) == before


@pytest.mark.slow
def test_restart_with_one_process_removes_the_other_ranks_caches(model, tmp_path):
    out = tmp_path / "out"
    killed = run_torchrun(args(model, out), fault="before_journal:1")
    assert killed.returncode != 0 and (out / ".streamprune" / "cache-rank1").is_dir()
    launched(run_cli(args(model, out, "--restart")))
    assert not (out / ".streamprune" / "cache-rank1").exists()


@pytest.mark.slow
def test_rule_flap_mean_equal_one_process(model, tmp_path):
    """The other sums: channel statistics (flap) and mean compensation, no survey."""
    extra = ("--allocation", "rule", "--method", "flap", "--compensate", "mean")
    launched(run_cli(args(model, tmp_path / "one", *extra)))
    launched(run_torchrun(args(model, tmp_path / "two", *extra)))
    assert kept_units(tmp_path / "two") == kept_units(tmp_path / "one")
    assert max_relative_difference(tmp_path / "one", tmp_path / "two") <= TOLERANCE


@pytest.mark.slow
def test_more_processes_than_windows_is_refused(model, tmp_path):
    result = run_torchrun(args(model, tmp_path / "out", samples=1))
    assert result.returncode != 0
    assert "--samples 1 is fewer than the 2 processes" in result.stderr


def test_a_rank_gets_whole_micro_batches_in_window_order():
    shares = [batch_share(10, 3, 3, r) for r in range(3)]  # micro-batches 3,3,3,1
    assert shares == [range(0, 3), range(3, 6), range(6, 10)]
    share = Share(10, 3, shares[2])
    assert share.batch_sizes == (3, 3, 3, 1) and share.local == range(2, 4)
    assert [batch_share(5, 2, 1, 0)] == [range(5)]
    assert shared_micro_batch(64, 10, 4) == 2 and shared_micro_batch(1, 10, 4) == 1
    for samples in range(1, 40):  # every rank gets at least one micro-batch
        for world in range(1, samples + 1):
            b = shared_micro_batch(64, samples, world)
            assert all(len(batch_share(samples, b, world, r)) for r in range(world))


def test_one_process_sees_every_batch_as_its_own():
    x = torch.arange(5.0).view(5, 1, 1)
    calib = Calibration(lambda: iter(x.split(2)), torch.ones(1, 1), torch.zeros(1, 1), torch.Generator(), 5)
    assert [(b, t.flatten().tolist()) for b, t in calib.every_batch()] == [(2, [0, 1]), (2, [2, 3]), (1, [4])]
    calib = Calibration(lambda: iter(x[2:4].split(2)), torch.ones(1, 1), torch.zeros(1, 1), torch.Generator(), 5,
                        ranks=SINGLE, batch_sizes=(2, 2, 1), local=range(1, 2))
    assert [(b, None if t is None else t.flatten().tolist()) for b, t in calib.every_batch()] == \
        [(2, None), (2, [2, 3]), (1, None)]


def test_other_ranks_caches_are_found_beside_any_cache_folder(tmp_path):
    """--restart clears the other ranks' caches of an earlier job, in OUT/.streamprune and in a
    --cache-dir alike (rank_cache_folder's names)."""
    from types import SimpleNamespace

    from streamprune.engine.distributed import other_rank_cache_folders, rank_cache_folder
    for base in (tmp_path / ".streamprune" / "cache", tmp_path / "dir" / "streamprune-cache-ab12"):
        ranks = [rank_cache_folder(base, SimpleNamespace(rank=k)) for k in range(3)]
        for folder in ranks + [base.with_name(base.name + "x-rank1")]:
            folder.mkdir(parents=True)
        assert other_rank_cache_folders(base) == ranks[1:]
