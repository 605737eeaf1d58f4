"""One 70B-shaped block (Llama-3-70B: hidden 8192, 64 heads / 8 KV heads, intermediate 28672,
bf16) pruned alone with default settings: predicted (plan) and measured peak memory, and seconds.

    python tools/block_bench.py --samples 4 --seq-len 256                 # CPU
    python tools/block_bench.py --device cuda --samples 128 --seq-len 2048 # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.synthetic import run_streamprune, synthetic_config, write_random_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--method", default=None, help="default: streamprune's default")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    method = ["--method", args.method] if args.method else []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = write_random_model(Path(tmp) / "block", synthetic_config(args.layers, 8192, 64, 8, 28672))
        plan = json.loads(subprocess.run(
            [sys.executable, "-m", "streamprune", "plan", "--shards", str(model), "--json", "--no-timing",
             "--device", args.device, "--samples", str(args.samples), "--seq-len", str(args.seq_len), *method],
            check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout)
        report, wall = run_streamprune(model, Path(tmp) / "out", "--device", args.device, "--samples", args.samples,
                                       "--seq-len", args.seq_len, *method)
    timing = report["timing"]
    result = {
        "benchmark": "70B-shaped block", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": args.device, "layers": args.layers, "samples": args.samples, "seq_len": args.seq_len,
        "method": report["arguments"]["method"], "micro_batch": timing["micro_batch"],
        "predicted_peak_host_gib": round(plan["peak_host_bytes"] / 2**30, 2),
        "predicted_peak_device_gib": round(plan["peak_device_bytes"] / 2**30, 2),
        "measured_peak_rss_gib": round(timing["peak_rss_bytes"] / 2**30, 2),
        "measured_peak_cuda_gib": round(timing.get("peak_cuda_bytes", 0) / 2**30, 2),
        "seconds_per_block": round(timing["blocks_seconds"] / args.layers, 1), "wall_seconds": round(wall, 1),
        "blocks": timing["blocks"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
