"""Speed and perplexity of exported GGUF files in llama.cpp (the prebuilt xllamacpp wheel): dense
against pruned, in each --type, on this machine. Prints and writes JSON.

    python tools/gguf_bench.py --model dense=./smollm2 --model p30=./smollm2-p30 --model p50=./smollm2-p50 \
        --text ../shared/data/kjv/eval.txt --types f16 q4_0 --repeats 5 --threads 1 --json docs/bench-gguf-smollm2.json

Each model is exported once per type (streamprune export) into --work. Then, --repeats times, every
file in turn (runs interleaved, so a slower moment of the machine hits all of them alike) is loaded
and given a fresh prompt of --prompt tokens (prompt processing, tokens/s) and asked for --decode
greedy tokens (decoding, tokens/s), from llama.cpp's own timings; the median of the repeats is
reported with its ratio to the first model of the same type. Perplexity: llama.cpp's, with its
default settings, over --windows windows of --seq-len tokens of --text (the windows of
`streamprune eval --seq-len`), next to streamprune's own on the same windows (--windows 0: none).
For the quantized types, the block matrices left in another type (rows the type's blocks do not
split) are counted.

The ceiling: decoding reads every matrix once per token, so its speed-up can at best be the ratio
of the matrices' bytes (the embedding table excluded: one row per token); prompt processing is
bounded by the ratio of their multiply-adds (the same ratio in one type). Both are printed."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.llamacpp import llama_cpp  # noqa: E402


def export(folder: Path, kind: str, work: Path) -> Path:
    out = work / f"{folder.name}-{kind}.gguf"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "streamprune", "export", str(folder), "--gguf", str(out), "--type", kind,
                        "--quiet"], check=True)
    return out


def matrix_bytes(gguf: Path) -> int:
    """Bytes of the matrices a token's forward multiplies by (all 2-D tensors but the embedding;
    a tied model multiplies by the embedding at the output)."""
    from gguf import GGUFReader
    r = GGUFReader(str(gguf))
    names = {t.name for t in r.tensors}
    total = 0
    for t in r.tensors:
        if len(t.shape) < 2:
            continue
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return total


def block_matrices_not_in(gguf: Path, kind: str) -> int:
    """How many of the blocks' matrices are not in GGML type `kind` (left in F16 by the export)."""
    from gguf import GGUFReader
    return sum(1 for t in GGUFReader(str(gguf)).tensors
               if t.name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type.name != kind.upper())


def speed(gguf: Path, prompt: list[int], decode: int, threads: int) -> tuple[float, float]:
    with llama_cpp(gguf, n_ctx=len(prompt) + decode + 8, threads=threads, exact=False) as llm:
        c = llm.server.handle_completions({"prompt": prompt, "n_predict": decode, "temperature": 0,
                                           "ignore_eos": True, "cache_prompt": False})
    t = c["timings"]
    return t["prompt_per_second"], t["predicted_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=FOLDER; the first is the reference")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--types", nargs="+", default=["f16", "q4_0"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("gguf-bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from streamprune.engine.evaluate import eval_windows, perplexity
    from streamprune.inputs.calibration import load_tokenizer, tokenize_file

    args.work.mkdir(parents=True, exist_ok=True)
    models = [(m.split("=", 1)[0], Path(m.split("=", 1)[1])) for m in args.model]
    ids = tokenize_file(load_tokenizer(models[0][1]), args.text, special_tokens=True)
    windows = eval_windows(ids, args.seq_len, args.windows)
    prompt = ids[-args.prompt:]
    files = {(name, kind): export(folder, kind, args.work) for kind in args.types for name, folder in models}
    results = {}
    for (name, kind), gguf in files.items():
        t0, ppl = time.time(), float("nan")
        if args.windows:
            with llama_cpp(gguf, n_ctx=args.seq_len + 8, threads=2, exact=False) as llm:
                ppl = llm.perplexity(windows)
        results[(name, kind)] = {"model": name, "type": kind, "file": str(gguf), "file_bytes": gguf.stat().st_size,
                                 "matrix_bytes": matrix_bytes(gguf), "ppl_llama_cpp": round(ppl, 4),
                                 "block_matrices_not_in_type": block_matrices_not_in(gguf, kind),
                                 "ppl_seconds": round(time.time() - t0, 1), "prompt_tps": [], "decode_tps": []}
        print(f"{name} {kind}: perplexity {ppl:.4f}, {results[(name, kind)]['block_matrices_not_in_type']} block "
              f"matrices not in {kind}", flush=True)
    for name, folder in models:
        ours = perplexity(folder, args.text, args.seq_len, max_windows=args.windows).ppl if args.windows else math.nan
        for kind in args.types:
            results[(name, kind)]["ppl_streamprune"] = round(ours, 4)
    for rep in range(args.repeats):
        for key, gguf in files.items():
            pp, tg = speed(gguf, prompt, args.decode, args.threads)
            results[key]["prompt_tps"].append(round(pp, 2))
            results[key]["decode_tps"].append(round(tg, 2))
            print(f"repeat {rep + 1}: {key[0]} {key[1]}: prompt {pp:.1f} tok/s, decode {tg:.1f} tok/s", flush=True)
    rows = []
    for (name, kind), r in results.items():
        ref = results[(models[0][0], kind)]
        r["prompt_tps_median"] = statistics.median(r["prompt_tps"])
        r["decode_tps_median"] = statistics.median(r["decode_tps"])
        r["prompt_speedup"] = round(r["prompt_tps_median"] / statistics.median(ref["prompt_tps"]), 3)
        r["decode_speedup"] = round(r["decode_tps_median"] / statistics.median(ref["decode_tps"]), 3)
        r["ceiling"] = round(ref["matrix_bytes"] / r["matrix_bytes"], 3)
        r["matrix_bytes_removed"] = round(1 - r["matrix_bytes"] / ref["matrix_bytes"], 4)
        rows.append(r)
        print(f"{name:>8} {kind:>5}: {r['file_bytes'] / 2**20:8.1f} MiB  ppl {r['ppl_llama_cpp']:8.3f} "
              f"(streamprune {r['ppl_streamprune']:.3f})  prompt {r['prompt_tps_median']:7.1f} tok/s "
              f"x{r['prompt_speedup']:.2f}  decode {r['decode_tps_median']:6.1f} tok/s x{r['decode_speedup']:.2f}  "
              f"ceiling x{r['ceiling']:.2f}  {r['block_matrices_not_in_type']} block matrices not in {kind}")
    report = {"threads": args.threads, "prompt_tokens": args.prompt, "decode_tokens": args.decode,
              "repeats": args.repeats, "text": str(args.text), "seq_len": args.seq_len, "windows": args.windows,
              "results": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
