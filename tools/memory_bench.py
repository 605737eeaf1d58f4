"""Peak memory vs depth: prune same-width random models of several depths in fresh processes and
print peak RSS per depth as JSON. Peak memory must not grow with the number of layers.

    python tools/memory_bench.py --layers 8 16 32 64 --json bench-memory.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.synthetic import bench_parser, emit, method_args, run_streamprune, synthetic_config, write_random_model  # noqa: E402


def main():
    p = bench_parser(__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--sparsity", type=float, default=0.3)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for layers in args.layers:
            model = write_random_model(Path(tmp) / f"m{layers}", synthetic_config(
                layers, args.hidden, args.heads, args.kv, args.intermediate))
            report, seconds = run_streamprune(model, Path(tmp) / f"out{layers}", "--samples", args.samples,
                                              "--seq-len", args.seq_len, "--sparsity", args.sparsity,
                                              *method_args(args))
            rows.append({"layers": layers, "seconds": round(seconds, 2),
                         "peak_rss_mib": round(report["timing"]["peak_rss_bytes"] / 2**20, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    emit({
        "benchmark": "peak RSS vs depth",
        "width": {"hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv, "intermediate": args.intermediate,
                  "dtype": "bfloat16"},
        "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "method": report["arguments"]["method"],
        "runs": rows, "ratio_deepest_to_shallowest": round(rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3),
    }, args.json)


if __name__ == "__main__":
    main()
