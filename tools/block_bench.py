"""One 70B-shaped block (Llama-3-70B: hidden 8192, 64 heads / 8 KV heads, intermediate 28672,
bf16) pruned alone with default settings: predicted (plan) and measured peak memory, seconds, and
the seconds of each phase (report.json's timing.phases).

    python tools/block_bench.py --samples 4 --seq-len 256 --budget 0.1    # CPU
    python tools/block_bench.py --device cuda --samples 128 --seq-len 2048 --calib LONG.txt  # GPU
    python tools/block_bench.py --device cuda --max-memory 16GiB --enforce-cap ...  # a 16 GiB card

(128 x 2048 tokens need a longer calibration text than the demo's ~148k tokens.) With
--enforce-cap the run's process may allocate no more GPU memory than --max-memory
(torch.cuda.set_per_process_memory_fraction): an overshoot fails the run, and the result says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamprune.units import parse_bytes
from tools.synthetic import (  # noqa: E402
    DEMO,
    ROOT,
    bench_parser,
    emit,
    method_args,
    run_streamprune,
    synthetic_config,
    write_random_model,
)


def gpu_name(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    import torch
    return {"gpu": torch.cuda.get_device_name(torch.device(device))}


def main():
    p = bench_parser(__doc__, samples=4, seq_len=256, hidden=8192, heads=64, kv=8, intermediate=28672)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--budget", type=float, help="perturb's --budget (default: streamprune's)")
    p.add_argument("--calib", type=Path, default=DEMO / "calib.txt", help="calibration text")
    p.add_argument("--max-memory", help="streamprune's --max-memory (e.g. 16GiB)")
    p.add_argument("--enforce-cap", action="store_true", help="the GPU may not allocate more than --max-memory")
    p.add_argument("--profile", action="store_true", help="exact phases on a GPU (streamprune --profile)")
    p.add_argument("--model", type=Path, help="reuse the random model in this folder (written there if absent)")
    args = p.parse_args()
    extra = [*method_args(args), *(["--budget", str(args.budget)] if args.budget else []),
             *(["--max-memory", args.max_memory] if args.max_memory else [])]
    cap = (parse_bytes(args.max_memory) if args.enforce_cap and args.max_memory and args.device.startswith("cuda")
           else None)
    shape = dict(samples=args.samples, seq_len=args.seq_len)
    config = synthetic_config(args.layers, args.hidden, args.heads, args.kv, args.intermediate)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = args.model or Path(tmp) / "block"
        if not (model / "config.json").is_file() or json.loads((model / "config.json").read_text()) != config:
            write_random_model(model, config)
        plan = json.loads(subprocess.run(
            [sys.executable, "-m", "streamprune", "plan", "--shards", str(model), "--json", "--no-timing",
             "--device", args.device, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
             *extra],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout)  # exit 1: does not fit
        result = {
            "benchmark": "block", "device": args.device, **gpu_name(args.device), "layers": args.layers,
            "shape": dict(hidden=args.hidden, heads=args.heads, kv=args.kv, intermediate=args.intermediate), **shape,
            "max_memory": args.max_memory, "cap_enforced": cap is not None,
            "grams_on": plan.get("grams_on"), "gram_chunk_columns": plan.get("gram_chunk_columns"),
            "predicted_peak_host_gib": round(plan["peak_host_bytes"] / 2**30, 2),
            "predicted_peak_device_gib": round(plan["peak_device_bytes"] / 2**30, 2), "plan_fits": plan["fits"],
        }
        try:
            report, wall = run_streamprune(model, Path(tmp) / "out", "--device", args.device, "--samples",
                                           args.samples, "--seq-len", args.seq_len, *extra,
                                           *(["--profile"] if args.profile else []), calib=args.calib,
                                           gpu_cap_bytes=cap)
        except subprocess.CalledProcessError as e:
            emit(dict(result, status=f"failed (exit {e.returncode})"), args.json)
            sys.exit(1)
    timing = report["timing"]
    emit(dict(
        result, status="ok", method=report["arguments"]["method"], budget=report["arguments"]["budget"],
        compensate=report["arguments"]["compensate"], micro_batch=timing["micro_batch"],
        measured_peak_rss_gib=round(timing["peak_rss_bytes"] / 2**30, 2),
        measured_peak_cuda_gib=round(timing.get("peak_cuda_bytes", 0) / 2**30, 2),
        seconds_per_block=round(timing["blocks_seconds"] / args.layers, 1), wall_seconds=round(wall, 1),
        survey_seconds_per_block=round(sum((timing.get("phases") or {}).get("survey", {}).values()) / args.layers, 1),
        phases=timing.get("phases"), blocks=timing["blocks"],
    ), args.json)


if __name__ == "__main__":
    main()
