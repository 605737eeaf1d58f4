"""One run per output folder: a second run refuses and names the first one's pid; a lock left
by a dead run is taken over."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamprune.engine import pipeline
from streamprune.errors import StreamPruneError
from streamprune.store.lock import OutputLock, lock_path
from tests.harness import run_config, tiny_model

ROOT = Path(__file__).resolve().parents[2]
HOLD = "import sys; from streamprune.store.lock import OutputLock; l = OutputLock(sys.argv[1]).__enter__(); " \
       "print('locked', flush=True); sys.stdin.read()"


@pytest.mark.slow
def test_second_run_into_the_same_folder_refuses_with_the_pid(tmp_path):
    src, out = tiny_model(tmp_path, layers=2), tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StreamPruneError, match=f"another streamprune run \\(pid {holder.pid}\\) is writing to"):
            pipeline.run(run_config(src, out))
        assert not (out / ".streamprune" / "journal.json").exists()
    finally:
        holder.communicate("")
    pipeline.run(run_config(src, out))  # the holder is gone: the lock is free
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.slow
def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    src, out = tiny_model(tmp_path, layers=2), tmp_path / "out"
    lock_path(out).parent.mkdir(parents=True)
    lock_path(out).write_text("999999\n")  # a killed run's pid; the kernel released its flock
    pipeline.run(run_config(src, out))
    assert lock_path(out).read_text() == f"{os.getpid()}\n"
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.slow
def test_lock_is_released_on_exit_and_survives_restart(tmp_path):
    src, out = tiny_model(tmp_path, layers=2), tmp_path / "out"
    pipeline.run(run_config(src, out))
    pipeline.run(run_config(src, out, sparsity=0.5, restart=True))
    with OutputLock(out):
        assert lock_path(out).is_file()
