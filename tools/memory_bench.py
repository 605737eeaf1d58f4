"""Peak memory vs depth: prune same-width random models of several depths in fresh processes and
print peak RSS per depth as JSON. Peak memory must not grow with the number of layers.

    python tools/memory_bench.py --layers 8 16 32 64 --json bench-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.synthetic import run_streamprune, synthetic_config, write_random_model  # noqa: E402


def prune(model: Path, out: Path, args) -> dict:
    report, seconds = run_streamprune(model, out, "--samples", args.samples, "--seq-len", args.seq_len,
                                      "--sparsity", args.sparsity, "--method", args.method)
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(report["timing"]["peak_rss_bytes"] / 2**20, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--method", default="magnitude")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for layers in args.layers:
            model = write_random_model(Path(tmp) / f"m{layers}", synthetic_config(
                layers, args.hidden, args.heads, args.kv, args.intermediate))
            rows.append({"layers": layers, **prune(model, Path(tmp) / f"out{layers}", args)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    base = rows[0]["peak_rss_mib"]
    result = {
        "benchmark": "peak RSS vs depth", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "width": {"hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv, "intermediate": args.intermediate,
                  "dtype": "bfloat16"},
        "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "method": args.method,
        "runs": rows, "ratio_deepest_to_shallowest": round(rows[-1]["peak_rss_mib"] / base, 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
