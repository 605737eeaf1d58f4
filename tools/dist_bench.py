"""Data-parallel benchmark: the same run with 1 process and with N processes (torchrun
--standalone; gloo on the CPU, NCCL with --device cuda): wall time, peak RSS of every rank, and how
far the N-process output lies from the 1-process one (largest relative tensor difference,
held-out perplexity). Prints JSON (and writes it with --json-out).

    python tools/dist_bench.py [--model ../shared/models/kjv-llama-6.8m] [--processes 1 2]
        [--samples 32] [--seq-len 256] [--batch-size 4] [--device cpu] [--json-out docs/dist_bench.json]

Each rank's peak RSS comes from this file run as a wrapper around `python -m streamprune`
(`--rank-wrapper DIR`), which writes it to DIR/rank-<RANK>.json when the rank exits."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def rank_wrapper(folder: str, argv: list[str]) -> None:
    """Run streamprune with `argv`; at exit, record this rank's peak RSS."""
    def record():
        from streamprune.engine.run_report import peak_rss_bytes
        rank = os.environ.get("RANK", "0")
        Path(folder, f"rank-{rank}.json").write_text(json.dumps(
            {"rank": int(rank), "peak_rss_bytes": peak_rss_bytes()}))
    atexit.register(record)
    sys.argv = ["streamprune", *argv]
    runpy.run_module("streamprune", run_name="__main__", alter_sys=True)


def run(n: int, run_args: list[str], rss_dir: Path) -> dict:
    rss_dir.mkdir(parents=True, exist_ok=True)
    wrapper = [str(Path(__file__).resolve()), "--rank-wrapper", str(rss_dir), *run_args]
    cmd = [sys.executable, *wrapper] if n == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *wrapper]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"{n} processes failed: {done.stderr[-2000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in rss_dir.glob("rank-*.json")), key=lambda r: r["rank"])
    return {"processes": n, "wall_seconds": round(wall, 2), "peak_rss_mib_per_rank":
            [round(r["peak_rss_bytes"] / 2**20) for r in ranks]}


def ppl(folder: Path, text: Path, seq_len: int, windows: int, device: str) -> float:
    from streamprune.engine.evaluate import perplexity
    return perplexity(folder, text, seq_len=seq_len, device=device, max_windows=windows).ppl


def max_relative_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    A = {k: v for f in sorted(a.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    B = {k: v for f in sorted(b.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    if A.keys() != B.keys() or any(A[k].shape != B[k].shape for k in A):
        return float("inf")  # different units kept
    return max(((A[k] - B[k]).abs().max() / A[k].abs().max().clamp_min(1e-30)).item() for k in A)


def main() -> None:
    if sys.argv[1:2] == ["--rank-wrapper"]:
        return rank_wrapper(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "kjv-llama-6.8m")
    ap.add_argument("--calib", type=Path, default=SHARED / "data" / "kjv" / "calib.txt")
    ap.add_argument("--eval", type=Path, default=SHARED / "data" / "kjv" / "eval.txt")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--extra", default="", help="more `run` arguments, e.g. '--allocation rule'")
    ap.add_argument("--json-out", type=Path)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    results = []
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        outs = {}
        for n in a.processes:
            out = Path(tmp) / f"out-{n}"
            run_args = ["run", "--shards", str(a.model), "--out", str(out), "--calib", str(a.calib), "--samples",
                        str(a.samples), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--sparsity",
                        str(a.sparsity), "--device", a.device, "--quiet", *a.extra.split()]
            r = run(n, run_args, Path(tmp) / f"rss-{n}")
            r["ppl"] = round(ppl(out, a.eval, a.seq_len, a.eval_windows, a.device), 5)
            outs[n] = out
            if n != a.processes[0]:
                first = a.processes[0]
                r["max_relative_tensor_difference_vs_%d" % first] = max_relative_difference(outs[first], out)
                r["ppl_relative_difference_vs_%d" % first] = abs(r["ppl"] / results[0]["ppl"] - 1)
                r["speedup_vs_%d" % first] = round(results[0]["wall_seconds"] / r["wall_seconds"], 2)
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    import torch
    report = {"model": a.model.name, "samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
              "sparsity": a.sparsity, "device": a.device, "extra": a.extra, "cpus": os.cpu_count(),
              "torch": torch.__version__, "machine": platform.machine(),
              "note": "torchrun sets OMP_NUM_THREADS=1 per rank; the 1-process run uses every core",
              "runs": results}
    print(json.dumps(report, indent=1))
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
