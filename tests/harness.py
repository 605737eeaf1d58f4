"""Helpers that run `streamprune` as a user would, for the tests and for tools/fault_bench.py:
the command in this process (`invoke`) and the check that it refused in one line (`refused`),
a tiny sharded model with the demo tokenizer, the `run` arguments, a child process with or without
a fault point (STREAMPRUNE_FAULT_POINT, streamprune/store/faults.py), the digests of an output folder,
and one interrupt-resume-compare trial. Imports go one way: tools import tests.harness, tests
never import tools."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from streamprune.store.faults import FAULT_POINT, FAULT_RANK

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
# The fault hook knows SIGKILL and SIGINT (":INT"); for SIGTERM at a named point the child runs
# `python -m streamprune` through this bootstrap, which makes the hook's SIGINT a SIGTERM.
TERM_AT_POINT = ("import runpy, signal, types, streamprune.store.faults as f; "
                 "f.signal = types.SimpleNamespace(SIGINT=signal.SIGTERM, SIGKILL=signal.SIGKILL); "
                 "runpy.run_module('streamprune', run_name='__main__', alter_sys=True)")


def invoke(*args, **kwargs):
    """`streamprune ARGS` in this process through click's CliRunner (each arg str()-ed, prog_name
    "streamprune"); `kwargs` go to CliRunner.invoke (input, env, catch_exceptions, ...)."""
    from click.testing import CliRunner

    from streamprune.cli import main
    kwargs.setdefault("prog_name", "streamprune")
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def refused(r, *patterns: str) -> str:
    """Assert that a command (a click Result from `invoke`, or a subprocess.CompletedProcess) was
    refused as a user should see it: exit status 2, no traceback or usage text, and stderr one line
    `error: ...` in which every regular expression of `patterns` is found. Returns that line."""
    code = r.exit_code if hasattr(r, "exit_code") else r.returncode
    output = r.output if hasattr(r, "output") else r.stdout + r.stderr
    assert code == 2, (code, output, getattr(r, "exception", None))
    assert "Traceback" not in output and "Usage:" not in output, output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    line = r.stderr.rstrip("\n")
    for pattern in patterns:
        assert re.search(pattern, line), (pattern, line)
    return line


def make_model(folder: Path, layers: int) -> Path:
    from tests.models import save_tiny_model
    return save_tiny_model(folder, "llama", layers=layers, vocab=512, tokenizer_from=DEMO / "stories260K",
                           shard_size="40KB")


def tiny_model(tmp_path: Path, family: str = "llama", layers: int = 3, **kw) -> Path:
    """A tiny sharded model of `family` with the demo tokenizer, in tmp_path/in-FAMILY."""
    from tests.models import save_tiny_model
    return save_tiny_model(tmp_path / f"in-{family}", family, layers=layers, vocab=512,
                           tokenizer_from=DEMO / "stories260K", **kw)


def run_config(shards: Path, out: Path, **kw):
    """A RunConfig for a quick run of a tiny model on the demo's text (`kw` over the defaults)."""
    from streamprune.config import RunConfig
    return RunConfig(**dict(dict(shards=shards, out=out, sparsity=0.3, calib=DEMO / "calib.txt", samples=4,
                                 seq_len=32, progress=False), **kw))


def run_args(model: Path, out: Path, samples: int, seq_len: int) -> list[str]:
    return [str(a) for a in ("run", "--shards", model, "--out", out, "--calib", DEMO / "calib.txt",
                             "--samples", samples, "--seq-len", seq_len, "--sparsity", 0.3, "--quiet")]


def child_env(fault: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop(FAULT_POINT, None)
    if fault:
        env[FAULT_POINT] = fault
    return env


def run_cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamprune", *args], env=child_env(fault),
                          capture_output=True, text=True)


def run_torchrun(args: list[str], processes: int = 2, fault: str | None = None,
                 fault_rank: int | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m streamprune ARGS` (a real launch: its own
    rendezvous on a free local port, gloo on the CPU); the fault, if any, hits `fault_rank` only."""
    env = child_env(fault)
    env.pop(FAULT_RANK, None)
    if fault_rank is not None:
        env[FAULT_RANK] = str(fault_rank)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), "-m", "streamprune", *args], env=env, capture_output=True, text=True)


def digests(folder: Path) -> dict:
    """sha256 of every file in the output folder; report.json without its timing section, and not
    the log (streamprune.log: its times and sessions differ from run to run)."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.name != "streamprune.log":
            data = f.read_bytes()
            if f.name == "report.json":
                report = json.loads(data)
                report.pop("timing")
                data = json.dumps(report, sort_keys=True).encode()
            out[f.name] = hashlib.sha256(data).hexdigest()
    return out


def blocks_done(out: Path) -> int | str:
    journal = out / ".streamprune" / "journal.json"
    if not journal.is_file():
        return 0
    state = json.loads(journal.read_text())
    return "complete" if state.get("complete") else len(state["blocks"])


def default_sigint() -> None:
    """Undo an inherited SIG_IGN (a background job of a non-interactive shell ignores SIGINT),
    so the run gets Python's Ctrl-C handling as it would in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(args: list[str], sig: int, point: tuple[str, int] | None = None,
              delay: float | None = None) -> tuple[int, str]:
    """Start a run and stop it with `sig`: at a named point, or after `delay` seconds."""
    fault = f"{point[0]}:{point[1]}" + ("" if sig == signal.SIGKILL else ":INT") if point else None
    how = ["-c", TERM_AT_POINT] if point and sig == signal.SIGTERM else ["-m", "streamprune"]
    p = subprocess.Popen([sys.executable, *how, *args], env=child_env(fault),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    if delay is not None:
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
    _, err = p.communicate()
    return p.returncode, err


def interruption_problem(rc: int, err: str, sig: int) -> str | None:
    if rc == 0:
        return None  # finished before the fault came
    if sig == signal.SIGKILL:
        return None if rc == -signal.SIGKILL else f"exit {rc}: {err.strip()[-300:]}"
    if rc != 128 + sig or "re-run the same command" not in err or "Traceback" in err:
        return f"{signal.Signals(sig).name} gave exit {rc}: {err.strip()[-300:]}"
    return None


def trial(args: list[str], out: Path, sig: int, reference: dict, finish=None, **how) -> dict:
    """One fault, one re-run to completion (`finish(out)`, default: the same command), one comparison."""
    rc, err = interrupt(args, sig, **how)
    result = {"interrupted": rc != 0, "exit": rc, "blocks_done": blocks_done(out)}
    problem = interruption_problem(rc, err, sig)
    if finish is not None:
        finish(out)
    else:
        done = run_cli(args)
        if done.returncode != 0:
            problem = problem or f"re-run failed ({done.returncode}): {done.stderr.strip()[-300:]}"
    if problem is None and digests(out) != reference:
        problem = "output differs from the uninterrupted run"
    if problem is None and (out / ".streamprune" / "cache").exists():
        problem = "activation cache left behind"
    return dict(result, survived=problem is None, problem=problem)


def interrupt_pruning_at(monkeypatch, layer: int):
    """Make the pruning pass raise KeyboardInterrupt (a Ctrl-C) when it reaches block `layer`;
    returns the undo (for the re-run that resumes)."""
    from streamprune.engine import pipeline
    real_prune = pipeline.BlockRunner.prune

    def interrupted(self, i, W):
        if i == layer:
            raise KeyboardInterrupt
        return real_prune(self, i, W)

    monkeypatch.setattr(pipeline.BlockRunner, "prune", interrupted)
    return lambda: monkeypatch.setattr(pipeline.BlockRunner, "prune", real_prune)


# Editing a model folder for the bad-input tests: its files' digests, a tensor's shard, a tensor or
# config.json changed in place, a tensor with a NaN (or `value`) in it.

def sha256_tree(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def change_tensor(folder: Path, name: str, change) -> None:
    from safetensors.torch import load_file, save_file
    path = shard_of(folder, name)
    tensors = load_file(path)
    tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def nan_at(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[7] = value
    return t
