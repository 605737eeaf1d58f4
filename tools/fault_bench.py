"""Fault injection: stop `streamprune run` at named points inside the pipeline and at random
moments, re-run the same command to completion, and check that every output file is
byte-identical to an uninterrupted run (report.json without its `timing` section). Prints JSON.

    python tools/fault_bench.py --signal KILL --random 20
    python tools/fault_bench.py --signal INT --random 20
    python tools/fault_bench.py --signal TERM --random 20

With SIGKILL the run must simply die; with SIGINT it must exit 130 and say how to resume, with
SIGTERM (timeout, Slurm, docker stop) the same with exit 143. Named points use the
STREAMPRUNE_FAULT_POINT hook (streamprune/faults.py): the process signals itself the count-th
time it passes the point."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamprune.faults import FAULT_POINT, POINTS  # noqa: E402

DEMO = ROOT / "demo"
SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
# The fault hook knows SIGKILL and SIGINT (":INT"); for SIGTERM at a named point the child runs
# `python -m streamprune` through this bootstrap, which makes the hook's SIGINT a SIGTERM.
TERM_AT_POINT = ("import runpy, signal, types, streamprune.faults as f; "
                 "f.signal = types.SimpleNamespace(SIGINT=signal.SIGTERM, SIGKILL=signal.SIGKILL); "
                 "runpy.run_module('streamprune', run_name='__main__', alter_sys=True)")
# every point at its first pass, and the points passed many times at a later pass too
RETRIES = 3  # random moments redrawn when the run finished first (a busy machine varies its speed)
NAMED = [(p, 1) for p in POINTS] + [(p, 3) for p in ("shard_read", "shard_mid_write", "before_journal",
                                                     "journal_before_rename", "cache_write", "final_files")]


def make_model(folder: Path, layers: int) -> Path:
    from tests.models import save_tiny_model
    return save_tiny_model(folder, "llama", layers=layers, vocab=512, tokenizer_from=DEMO / "stories260K",
                           shard_size="40KB")


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


def digests(folder: Path) -> dict:
    """sha256 of every file in the output folder; report.json without its timing section."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
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


def bench(sig_name: str, n_random: int, named: bool, layers: int, samples: int, seq_len: int, seed: int,
          workdir: str | None) -> dict:
    sig, rng = SIGNALS[sig_name], random.Random(seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", layers)
        n_shards = len(list(model.glob("*.safetensors")))
        t0 = time.time()
        ref = run_cli(run_args(model, tmp / "reference", samples, seq_len))
        seconds = time.time() - t0
        if ref.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed: {ref.stderr}")
        reference = digests(tmp / "reference")
        # random moments between the end of Python's start-up (imports) and the end of the run
        startup = max(0.0, seconds - json.loads((tmp / "reference" / "report.json").read_text())["timing"]["seconds"])
        trials = []
        plan = [{"point": p} for p in NAMED] if named else []
        plan += [{"delay": round(rng.uniform(startup, seconds), 3)} for _ in range(n_random)]
        for i, how in enumerate(plan):
            out = tmp / f"trial-{i}"
            r = trial(run_args(model, out, samples, seq_len), out, sig, reference, **how)
            for _ in range(RETRIES):  # the run beat the random moment: draw an earlier one
                if r["interrupted"] or "delay" not in how:
                    break
                shutil.rmtree(out, ignore_errors=True)
                how = {"delay": round(rng.uniform(startup, how["delay"]), 3)}
                r = trial(run_args(model, out, samples, seq_len), out, sig, reference, **how)
            trials.append(dict({"point": ":".join(map(str, how["point"]))} if "point" in how else how, **r))
            print(json.dumps(trials[-1]), file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    return {
        "benchmark": "fault injection: interrupt, re-run, compare bytes",
        "signal": f"SIG{sig_name}", "model": {"family": "llama", "layers": layers, "shards": n_shards},
        "calibration": {"samples": samples, "seq_len": seq_len},
        "uninterrupted_seconds": round(seconds, 2), "startup_seconds": round(startup, 2),
        "tried": len(trials), "interrupted": sum(t["interrupted"] for t in trials),
        "survived": sum(t["survived"] for t in trials),
        "failures": [t for t in trials if not t["survived"]],
        "trials": trials,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--signal", choices=SIGNALS, default="KILL")
    p.add_argument("--random", type=int, default=20, help="Interruptions at random moments of the run.")
    p.add_argument("--no-named", dest="named", action="store_false", help="Skip the named fault points.")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="Where the temporary model and outputs go.")
    p.add_argument("--json", help="Also write the result to this file.")
    a = p.parse_args()
    result = bench(a.signal, a.random, a.named, a.layers, a.samples, a.seq_len, a.seed, a.workdir)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    sys.exit(0 if result["survived"] == result["tried"] else 1)


if __name__ == "__main__":
    main()
