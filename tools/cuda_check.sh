#!/usr/bin/env bash
# The checks that need a GPU, in one go, within 10 minutes on one H100/H200 (issue 16). Run it
# where CUDA is; CI has no GPU and skips the CUDA variants of the tests.
#   1. the CUDA variants of the comparison tests (pytest -k cuda): streamed forward and perplexity
#      against transformers, 0% identity, sliced == computed, resume byte-identical, every method
#   2. a 70B-shaped block at the default method and compensation, 128 x 2048 calibration tokens,
#      --budget 1, with --max-memory 24GiB, 16GiB and 8GiB, each cap enforced on the GPU
#      (torch.cuda.set_per_process_memory_fraction: an overshoot fails the run), --profile: the
#      seconds of each phase, the plan's choice (grams_on), predicted and measured peaks
#   3. an 8B-shaped block (Llama-3-8B: 4096, 32 / 8 heads, 14336 neurons) at the same settings
#   4. the demo pruned on the GPU and on the CPU: perplexity, seconds, peak GPU memory
#   5. if MODEL, CALIB and EVAL are set: a bf16 copy of MODEL pruned on the GPU (bf16 compute)
# Every result is JSON in RESULTS_DIR (copy it to docs/), summary.txt one line per run.
#
#   bash tools/cuda_check.sh [RESULTS_DIR]      (default: ./cuda-check)
#   PARTS="70b 8b" bash tools/cuda_check.sh R   (some of: tests 70b 8b demo depth; default all but depth)
#   CAPS="24GiB 16GiB 8GiB" ...                  (the caps of part 70b; default 24GiB only: at 16 and 8 GiB
#                                                the Gram matrices go to the host, whose factorizations run on
#                                                one CPU thread, minutes per block: see docs/performance.md)
#   TESTS_TIMEOUT, CAP_TIMEOUT, MID_TIMEOUT: seconds for the tests, each 70B cap, the 8B block (180, 150, 90)
#   DRY=1 DEVICE=cpu ... : the same steps on tiny shapes on a CPU (checks the script itself)
set -u -o pipefail
cd "$(dirname "$0")/.."
R=$(realpath -m "${1:-cuda-check}")
mkdir -p "$R"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PARTS=${PARTS:-tests 70b 8b demo}
DEV=${DEVICE:-cuda}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
T0=$(date +%s)
part() { [[ " $PARTS " == *" $1 "* ]]; }
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
summary() {  # perplexity and cost from a report.json
    $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); e, t = r["eval"], r["timing"]
print("%s: ppl %.3f -> %.3f, %.1f s, peak GPU %d MiB, peak RSS %d MiB" % (sys.argv[2], e["ppl_before"],
      e["ppl_after"], t["seconds"], t["peak_cuda_bytes"] / 2**20, t["peak_rss_bytes"] / 2**20))' "$1" "$2" \
        | tee -a "$R/summary.txt"
}
block_line() {  # one line from a block_bench JSON
    $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); ph = r.get("phases") or {}
top = lambda d: ", ".join("%s %.1f" % kv for kv in sorted(d.items(), key=lambda kv: -kv[1])[:6])
print("%s: %s, grams on %s, peak GPU %s GiB (plan %s), survey %s s + prune %s s per block | survey: %s | prune: %s" % (
    sys.argv[2], r["status"], r.get("grams_on"), r.get("measured_peak_cuda_gib"), r["predicted_peak_device_gib"],
    r.get("survey_seconds_per_block"), r.get("seconds_per_block"), top(ph.get("survey", {})), top(ph.get("prune", {}))))' \
        "$1" "$2" | tee -a "$R/summary.txt"
}

if [ -n "${DRY:-}" ]; then  # tiny shapes: the script's own check, on any device
    BIG="--hidden 256 --heads 8 --kv 2 --intermediate 1024"; MID="--hidden 128 --heads 4 --kv 2 --intermediate 512"
    TOK="--samples 4 --seq-len 128"; CAPS="4GiB"; PYTEST_K="cuda and scoring"
else
    BIG="--hidden 8192 --heads 64 --kv 8 --intermediate 28672"; MID="--hidden 4096 --heads 32 --kv 8 --intermediate 14336"
    TOK="--samples 128 --seq-len 2048"; CAPS=${CAPS:-24GiB}; PYTEST_K="cuda"
fi

stamp "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$R/gpu.txt"

if part tests; then
    stamp "tests, CUDA variants"
    timeout ${TESTS_TIMEOUT:-180} $PY -m pytest -q -p no:cacheprovider -k "$PYTEST_K" -rs tests 2>&1 | tee "$R/pytest.txt" | tail -15
fi

# 128 x 2048 tokens need ~262k tokens of text: the demo's calibration text four times
for _ in 1 2 3 4; do cat demo/calib.txt; done > "$W/calib.txt"

if part 70b; then
    for cap in $CAPS; do
        stamp "70B-shaped block, default method, $TOK, --max-memory $cap (enforced)"
        timeout ${CAP_TIMEOUT:-150} $PY tools/block_bench.py --device "$DEV" $BIG $TOK --calib "$W/calib.txt" --workdir "$W" \
            --model "$W/block70" --max-memory "$cap" --enforce-cap --profile \
            --json "$R/bench-block-70b-$cap-$DEV.json" > "$R/block-70b-$cap.log" 2>&1
        rc=$?
        if [ -f "$R/bench-block-70b-$cap-$DEV.json" ]; then block_line "$R/bench-block-70b-$cap-$DEV.json" "70B $cap (exit $rc)"
        else echo "70B $cap: exit $rc, no result (exit 124: the timeout)" | tee -a "$R/summary.txt"; tail -3 "$R/block-70b-$cap.log"; fi
    done
    rm -rf "$W/block70"
fi

if part 8b; then
    stamp "8B-shaped block, default method, $TOK"
    timeout ${MID_TIMEOUT:-90} $PY tools/block_bench.py --device "$DEV" $MID $TOK --calib "$W/calib.txt" --workdir "$W" --profile \
        --json "$R/bench-block-8b-$DEV.json" > "$R/block-8b.log" 2>&1
    rc=$?
    if [ -f "$R/bench-block-8b-$DEV.json" ]; then block_line "$R/bench-block-8b-$DEV.json" "8B (exit $rc)"
    else echo "8B: exit $rc, no result" | tee -a "$R/summary.txt"; tail -3 "$R/block-8b.log"; fi
fi

if part depth; then  # not in the default PARTS: peak GPU memory against depth (docs/performance.md section 4)
    for n in 2 8; do
        stamp "peak GPU memory, $n 8B-shaped blocks, 16 x 2048 tokens"
        timeout 200 $PY tools/block_bench.py --device "$DEV" --layers $n $MID --samples 16 --seq-len 2048 \
            --workdir "$W" --json "$R/bench-depth-$n-$DEV.json" > "$R/depth-$n.log" 2>&1 \
            && block_line "$R/bench-depth-$n-$DEV.json" "depth $n"
    done
fi

if part demo; then
    stamp "demo (stories260K, 30%), $DEV and CPU"
    for dev in $(echo "$DEV cpu" | tr ' ' '\n' | sort -u); do
        timeout 60 $PY -m streamprune run --shards demo/stories260K --out "$W/demo-$dev" --calib demo/calib.txt \
            --samples 64 --seq-len 256 --sparsity 0.3 --eval demo/eval.txt --device $dev --quiet --restart \
            && cp "$W/demo-$dev/report.json" "$R/demo-$dev.json" && summary "$R/demo-$dev.json" "demo $dev"
    done
fi

if [ -n "${MODEL:-}" ]; then
    stamp "$MODEL in bf16 (30%), GPU"
    $PY -c 'import sys, torch; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T
M.from_pretrained(sys.argv[1]).to(torch.bfloat16).save_pretrained(sys.argv[2], max_shard_size="10MB")
T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])' "$MODEL" "$W/bf16"
    timeout 200 $PY -m streamprune run --shards "$W/bf16" --out "$W/bf16-out" --calib "$CALIB" --eval "$EVAL" \
        --samples 64 --seq-len 256 --sparsity 0.3 --device cuda --quiet --restart \
        && cp "$W/bf16-out/report.json" "$R/bf16-cuda.json" && summary "$R/bf16-cuda.json" "$(basename "$MODEL") bf16 cuda"
fi
stamp "done"
