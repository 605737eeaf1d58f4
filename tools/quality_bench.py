"""Pruning quality: prune real small models with each method at several sparsities, each run in a
fresh process with --eval, and compare perplexity on held-out text with the dense model's. Writes
JSON (one row per run) and markdown (one table per model: perplexity, then time and peak RSS).

    python tools/quality_bench.py --methods magnitude --json docs/quality-magnitude.json \\
        --markdown docs/quality-magnitude.md

A method may carry its own extra run options after '+': `perturb+--no-compensate` runs
`--method perturb --no-compensate` and is labelled as written. --extra-args go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamprune.pruning.scoring import SCORERS  # noqa: E402
from tools.synthetic import ROOT, emit, run_streamprune  # noqa: E402

DATA = {"kjv-": "kjv", "stories": "tinystories"}  # model name prefix -> folder under --data-dir


def rel(path: Path) -> str:
    """A path as written relative to the repository (so results don't carry this machine's paths)."""
    return os.path.relpath(path, ROOT)


def texts(model: str, data_dir: Path) -> tuple[Path, Path]:
    """The model's in-domain calibration and evaluation text."""
    for prefix, folder in DATA.items():
        if model.startswith(prefix):
            calib, ev = data_dir / folder / "calib.txt", data_dir / folder / "eval.txt"
            for f in (calib, ev):
                if not f.is_file():
                    sys.exit(f"missing {f}")
            return calib, ev
    sys.exit(f"no data for model {model!r} (known prefixes: {', '.join(DATA)})")


def parse_method(spec: str) -> tuple[str, list[str]]:
    """'perturb+--no-compensate' -> ('perturb', ['--no-compensate'])."""
    name, *extra = spec.split("+")
    if name not in SCORERS:
        sys.exit(f"unknown method {name!r} in {spec!r}; choose from {', '.join(SCORERS)}")
    return name, extra


def one_run(model: Path, out: Path, calib: Path, ev: Path, method: str, extra: list[str], sparsity: float,
            args) -> dict:
    report, wall = run_streamprune(
        model, out, "--eval", ev, "--eval-seq-len", args.seq_len, "--samples", args.samples, "--seq-len", args.seq_len,
        "--sparsity", sparsity,
        "--method", method, "--seed", 0, *extra, *shlex.split(args.extra_args), calib=calib)
    e, t, p = report["eval"], report["timing"], report["block_params"]
    return {
        "ppl_before": e["ppl_before"], "ppl": e["ppl_after"],
        "removed_fraction": round(p["removed_fraction"], 4),
        "block_params_before": p["before"], "block_params_after": p["after"],
        # report seconds include the dense evaluation done before pruning; leave it out
        "prune_seconds": round(t["seconds"] - t["eval_seconds"]["before"], 2),
        "wall_seconds": round(wall, 2), "peak_rss_mib": round(t["peak_rss_bytes"] / 2**20, 1),
        "eval_windows": e["windows"], "eval_seq_len": e["seq_len"],
    }


def markdown(rows: list[dict], dense: dict, args) -> str:
    lines = ["# Pruning quality\n",
             f"Perplexity on held-out text after pruning (calibration: {args.samples} windows of "
             f"{args.seq_len} tokens, seed 0; evaluation windows of {args.seq_len} tokens). In parentheses: "
             "the increase over the dense model. Columns: --sparsity, with the fraction of block parameters "
             "actually removed. Best per column in bold (when more than one method)."
             + (f" Extra run options: `{args.extra_args}`." if args.extra_args else "")]
    for model, d in dense.items():
        mrows = [r for r in rows if r["model"] == model]
        labels = list(dict.fromkeys(r["method"] for r in mrows))
        sps = list(dict.fromkeys(r["sparsity"] for r in mrows))
        cell = {(r["method"], r["sparsity"]): r for r in mrows}
        removed = {s: next(r["removed_fraction"] for r in mrows if r["sparsity"] == s) for s in sps}
        head = "| method | " + " | ".join(f"{s} ({100 * removed[s]:.1f}%)" for s in sps) + " |"
        rule = "|---|" + "---:|" * len(sps)
        lines += [f"\n## {model}\n", f"Dense perplexity: {d['ppl']:.3f} on `{d['eval']}`.\n", head, rule]
        best = {s: min((cell[m, s]["ppl"] for m in labels if (m, s) in cell), default=None) for s in sps}
        for m in labels:
            cells = []
            for s in sps:
                r = cell.get((m, s))
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['ppl']:.2f} (+{100 * (r['ppl'] / d['ppl'] - 1):.1f}%)"
                cells.append(f"**{text}**" if len(labels) > 1 and r["ppl"] == best[s] else text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["\nPruning time (without evaluation) and peak RSS of the run:\n",
                  "| method | " + " | ".join(str(s) for s in sps) + " |", rule]
        for m in labels:
            lines.append(f"| {m} | " + " | ".join(
                f"{cell[m, s]['prune_seconds']:.1f} s, {cell[m, s]['peak_rss_mib']:.0f} MiB" if (m, s) in cell else ""
                for s in sps) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["kjv-llama-6.8m", "kjv-qwen3-10.9m", "stories260K"])
    p.add_argument("--methods", nargs="+", default=None, help="default: every method streamprune knows")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation window")
    p.add_argument("--extra-args", default="", help='options for every run, e.g. "--compensate"')
    p.add_argument("--models-dir", type=Path, default=ROOT.parent / "shared" / "models")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--workdir", type=Path, help="where the pruned models go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the pruned models")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    args = p.parse_args()
    args.methods = args.methods or list(SCORERS)
    methods = {spec: parse_method(spec) for spec in args.methods}
    data = {m: texts(m, args.data_dir) for m in args.models}
    for m in args.models:
        if not (args.models_dir / m / "config.json").is_file():
            sys.exit(f"no model at {args.models_dir / m}")

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="quality-", dir=args.workdir))
    rows, dense, t0 = [], {}, time.time()
    try:
        for model in args.models:
            calib, ev = data[model]
            for label, (method, extra) in methods.items():
                for s in args.sparsities:
                    out = work / model / f"{label.replace('/', '_')}-{s}"
                    r = one_run(args.models_dir / model, out, calib, ev, method, extra, s, args)
                    d = dense.setdefault(model, {"ppl": r["ppl_before"], "eval": rel(ev), "calib": rel(calib)})
                    if abs(r["ppl_before"] - d["ppl"]) > 1e-6 * d["ppl"]:
                        print(f"warning: dense perplexity differs between runs: {r['ppl_before']} vs {d['ppl']}",
                              file=sys.stderr)
                    rows.append({"model": model, "method": label, "scorer": method, "sparsity": s,
                                 **{k: v for k, v in r.items() if k != "ppl_before"}})
                    print(json.dumps(rows[-1]), file=sys.stderr)
                    if not args.keep:
                        shutil.rmtree(out)
    finally:
        if args.keep:
            print(f"pruned models kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    arguments = {k: rel(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    emit({"benchmark": "perplexity after pruning", "arguments": arguments, "seed": 0,
          "total_seconds": round(time.time() - t0, 1), "dense": dense, "rows": rows}, args.json)
    if args.markdown:
        args.markdown.write_text(markdown(rows, dense, args))


if __name__ == "__main__":
    main()
