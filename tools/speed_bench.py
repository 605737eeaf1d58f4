"""A run's time against the yardstick of one dense streaming forward, and against the plan: for
each model, `streamprune plan --json` (its time range and dense passes), then `streamprune run` in
a fresh process with the same options; writes one JSON row per run (seconds, dense passes
measured, the plan's range and whether it covered the run, seconds per phase, peak RSS,
perplexity before and after with --eval).

    python tools/speed_bench.py --model ../bench/smollm2 --calib ../shared/data/kjv/calib.txt \\
        --eval ../shared/data/kjv/eval.txt --json docs/bench-speed-smollm2.json \\
        -- --samples 64 --seq-len 256 --eval-seq-len 256 --sparsity 0.3

Everything after `--` goes to both plan and run (plan ignores what it does not take: the
evaluation options). --survey-from DIR copies a finished run's folder first, so the run reuses
its survey (`streamprune run` keeps the survey across --sparsity, --allocation, --method,
--budget); the row then says so, and its seconds count the survey's blocks as they were timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.synthetic import ROOT, emit  # noqa: E402

PLAN_TAKES = {"--samples", "--seq-len", "--sparsity", "--allocation", "--method", "--budget", "--compensate",
              "--device", "--multiple-of", "--row-multiple", "--batch-size", "--max-memory"}


def plan_args(args: list[str]) -> list[str]:
    """The options of `args` (option value pairs) that plan takes."""
    out = []
    for option, value in zip(args[::2], args[1::2]):
        if option in PLAN_TAKES:
            out += [option, value]
    return out


def streamprune(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], check=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE if capture else
                          subprocess.DEVNULL)


def bench(model: Path, out: Path, calib: Path, eval_text: Path | None, args: list[str],
          survey_from: Path | None) -> dict:
    plan = json.loads(streamprune("plan", "--shards", model, "--out", out, "--calib", calib, "--json",
                                  *plan_args(args), capture=True).stdout)
    if out.exists():
        shutil.rmtree(out)
    if survey_from is not None:  # a finished run's folder, its pruning forgotten: what --survey-only leaves
        shutil.copytree(survey_from, out)
        journal = out / ".streamprune" / "journal.json"
        state = json.loads(journal.read_text())
        # the time so far: the survey's blocks (the seconds of the run then add this run's setup,
        # pruning and writing: a whole run's, less the first run's setup)
        # (and the evaluation before, which is carried and which the run's seconds then leave out)
        before = state.get("eval", {}).get("before", {}).get("seconds", 0.0)
        state.update(blocks={}, complete=False,
                     wall_seconds=sum(b["seconds"] for b in state["survey"].values()) + before)
        for key in ("blocks_seconds", "sessions"):
            state.pop(key, None)
        state["eval"] = {k: v for k, v in state.get("eval", {}).items() if k == "before"}  # (measured once)
        journal.write_text(json.dumps(state))
    t0 = time.time()
    streamprune("run", "--shards", model, "--out", out, "--calib", calib, "--quiet",
                *(("--eval", eval_text) if eval_text else ()), *args)
    wall = time.time() - t0
    report = json.loads((out / "report.json").read_text())
    t, p, e = report["timing"], plan["time"], report.get("eval", {})
    return {
        "model": str(model.name), "args": args, "survey_reused": survey_from is not None,
        "seconds": t["seconds"], "dense_pass_seconds": t.get("dense_pass_seconds"),
        "dense_passes": t.get("dense_passes"), "wall_seconds": round(wall, 1), "peak_rss_bytes": t["peak_rss_bytes"],
        "plan": {"seconds": p["seconds"], "low_seconds": p["low_seconds"], "high_seconds": p["high_seconds"],
                 "passes": plan["passes"], "peak_host_bytes": plan["peak_host_bytes"],
                 "samples": plan["samples"], "seq_len": plan["seq_len"],
                 "covers": p["low_seconds"] <= t["seconds"] <= p["high_seconds"]},
        "ppl_before": e.get("ppl_before"), "ppl_after": e.get("ppl_after"),
        "shapes": [[b["heads"][1], b["kv_heads"][1], b["neurons"][1]] for b in report["blocks"]],
        "phases": t["phases"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--eval", type=Path)
    p.add_argument("--out", type=Path, help="Run folder (default: beside the model, <model>-speed).")
    p.add_argument("--survey-from", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("args", nargs="*", help="after --: options for plan and run")
    a = p.parse_args()
    out = a.out or a.model.with_name(a.model.name + "-speed")
    emit(bench(a.model, out, a.calib, a.eval, a.args, a.survey_from), a.json)


if __name__ == "__main__":
    main()
