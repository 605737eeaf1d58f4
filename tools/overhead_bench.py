"""Overhead ratio: total wall time / (time to read every block's shards once + time of the
scoring and output forwards alone), measured in the same run, with and without overlap
(prefetch of the next block, background shard writes). Target <= 1.3 with overlap.

    python tools/overhead_bench.py --layers 16 --json bench-overhead.json
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.synthetic import bench_parser, emit, method_args, run_streamprune, synthetic_config, write_random_model  # noqa: E402


def drop_page_cache() -> bool:
    """Make the run read its shards from disk, not from memory (needs root; Linux)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(model: Path, out: Path, args, overlap: bool) -> dict:
    extra = [] if overlap else ["--no-overlap"]
    cold = args.cold and drop_page_cache()
    report, wall = run_streamprune(model, out, "--samples", args.samples, "--seq-len", args.seq_len,
                                   *method_args(args), *extra)
    blocks = report["timing"]["blocks"]
    read = sum(b["read_seconds"] for b in blocks)
    compute = sum(b["score_seconds"] + b["forward_seconds"] for b in blocks)
    total = report["timing"]["seconds"]
    return {"overlap": overlap, "cold_page_cache": cold, "total_seconds": round(total, 2),
            "blocks_seconds": report["timing"]["blocks_seconds"],
            "read_seconds": round(read, 2), "compute_seconds": round(compute, 2),
            "ratio": round(total / (read + compute), 3),
            "ratio_block_phase": round(report["timing"]["blocks_seconds"] / (read + compute), 3)}


def main():
    p = bench_parser(__doc__)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--cold", action="store_true", help="drop the OS page cache before each run (root)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = write_random_model(Path(tmp) / "model", synthetic_config(
            args.layers, args.hidden, args.heads, args.kv, args.intermediate))
        runs = [measure(model, Path(tmp) / "out", args, overlap) for overlap in (True, False)]
    emit({"benchmark": "overhead ratio", "model": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
          "runs": runs}, args.json)


if __name__ == "__main__":
    main()
