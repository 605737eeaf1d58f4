"""Fault injection: stop `streamprune run` at named points inside the pipeline and at random
moments, re-run the same command to completion, and check that every output file is
byte-identical to an uninterrupted run (report.json without its `timing` section). Prints JSON.

    python tools/fault_bench.py --signal KILL --random 20
    python tools/fault_bench.py --signal INT --random 20
    python tools/fault_bench.py --signal TERM --random 20

With SIGKILL the run must simply die; with SIGINT it must exit 130 and say how to resume, with
SIGTERM (timeout, Slurm, docker stop) the same with exit 143. Named points use the
STREAMPRUNE_FAULT_POINT hook (streamprune/store/faults.py): the process signals itself the count-th
time it passes the point."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamprune.store.faults import POINTS  # noqa: E402
from tests.harness import digests, make_model, run_args, run_cli, trial  # noqa: E402

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
# every point at its first pass, and the points passed many times at a later pass too
RETRIES = 3  # random moments redrawn when the run finished first (a busy machine varies its speed)
NAMED = [(p, 1) for p in POINTS] + [(p, 3) for p in ("shard_read", "shard_mid_write", "before_journal",
                                                     "journal_before_rename", "cache_write", "final_files")]


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
