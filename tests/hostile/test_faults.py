"""Killed, interrupted, terminated or out-of-disk runs resume to byte-identical output. A fast
variant of tools/fault_bench.py (a few named fault points; both use tests/harness.py) plus a disk
that fills up mid-run."""

import json
import signal

import pytest
from click.testing import CliRunner

from streamprune.cli import main
from streamprune.config import RunConfig
from streamprune.engine import pipeline
from streamprune.store import faults
from tests.harness import DEMO, digests, make_model, run_args, trial

SAMPLES, SEQ_LEN = 4, 32


def finish(model, out):
    return pipeline.run(RunConfig(shards=model, out=out, calib=DEMO / "calib.txt", samples=SAMPLES, seq_len=SEQ_LEN,
                                  sparsity=0.3, progress=False))


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    model = make_model(tmp / "model", layers=3)
    finish(model, tmp / "reference")
    return model, digests(tmp / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("point,count,sig", [
    ("shard_mid_write", 2, signal.SIGKILL),
    ("before_journal", 1, signal.SIGKILL),
    ("journal_mid_write", 4, signal.SIGKILL),
    ("final_files", 2, signal.SIGKILL),
    ("cache_delete", 1, signal.SIGKILL),
    ("file_before_rename", 1, signal.SIGKILL),  # the cache folder's mark, not yet in place
    ("after_scoring", 2, signal.SIGINT),
])
def test_interrupted_run_resumes_to_identical_bytes(model_and_reference, tmp_path, point, count, sig):
    model, reference = model_and_reference
    out = tmp_path / "out"
    r = trial(run_args(model, out, SAMPLES, SEQ_LEN), out, sig, reference, finish=lambda o: finish(model, o),
              point=(point, count))
    assert r["interrupted"] and r["survived"], r
    if sig == signal.SIGINT:  # the log says why the first session stopped
        assert "WARNING interrupted (Ctrl-C); finished blocks are saved" in (out / "streamprune.log").read_text()


@pytest.mark.slow
def test_sigterm_exits_143_and_the_same_command_resumes(model_and_reference, tmp_path):
    """SIGTERM (timeout, Slurm, docker stop) is a Ctrl-C with exit 143, here while block 1's shard is
    half-written on the writer thread; the re-run is the same command, in a new process."""
    model, reference = model_and_reference
    out = tmp_path / "out"
    r = trial(run_args(model, out, SAMPLES, SEQ_LEN), out, signal.SIGTERM, reference, point=("shard_mid_write", 2))
    assert r["interrupted"] and r["exit"] == 143 and r["survived"], r
    assert "WARNING interrupted (SIGTERM); finished blocks are saved" in (out / "streamprune.log").read_text()


def written_by_a_whole_run(model, out, monkeypatch) -> int:
    monkeypatch.setenv(faults.DISK_LIMIT, str(10**12))
    faults.reset()
    finish(model, out)
    return faults._written


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.95])
def test_full_disk_is_one_line_error_and_resumes(model_and_reference, tmp_path, monkeypatch, fraction):
    model, reference = model_and_reference
    limit = int(fraction * written_by_a_whole_run(model, tmp_path / "measure", monkeypatch))
    out = tmp_path / "out"
    monkeypatch.setenv(faults.DISK_LIMIT, str(limit))
    faults.reset()
    r = CliRunner().invoke(main, run_args(model, out, SAMPLES, SEQ_LEN))
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stderr.startswith("error: no space left on device while writing ") and r.stderr.count("\n") == 1
    assert "ERROR stopped by an error: no space left on device" in (out / "streamprune.log").read_text()
    assert "re-run the same command to resume" in r.stderr
    journal = json.loads((out / ".streamprune" / "journal.json").read_text())
    assert not journal["complete"] and not (out / "model.safetensors.index.json").exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.delenv(faults.DISK_LIMIT)
    finish(model, out)
    assert digests(out) == reference
