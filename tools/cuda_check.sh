#!/usr/bin/env bash
# The checks that need a GPU, in one go (a few minutes on one H100/H200). Run it where CUDA is;
# CI has no GPU and skips the CUDA variants of the tests.
#   1. the CUDA variants of the comparison tests (pytest -k cuda): streamed forward and perplexity
#      against transformers, 0% identity, sliced == computed, resume byte-identical, every method
#   2. the 70B-shaped block benchmark at default settings, 128 x 2048 calibration tokens
#   3. peak GPU memory against depth: 2 and 8 Llama-3-8B-shaped blocks
#   4. the demo pruned on the GPU and on the CPU: perplexity, seconds, peak GPU memory
#   5. if MODEL, CALIB and EVAL are set: a bf16 copy of MODEL pruned on the GPU (bf16 compute)
#
#   bash tools/cuda_check.sh [RESULTS_DIR]      (default: ./cuda-check)
set -u -o pipefail
cd "$(dirname "$0")/.."
R=$(realpath -m "${1:-cuda-check}")
mkdir -p "$R"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
summary() {  # perplexity and cost from a report.json
    $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); e, t = r["eval"], r["timing"]
print("%s: ppl %.3f -> %.3f, %.1f s, peak GPU %d MiB, peak RSS %d MiB" % (sys.argv[2], e["ppl_before"],
      e["ppl_after"], t["seconds"], t["peak_cuda_bytes"] / 2**20, t["peak_rss_bytes"] / 2**20))' "$1" "$2" \
        | tee -a "$R/summary.txt"
}

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$R/gpu.txt"

echo "== tests, CUDA variants"
timeout 300 $PY -m pytest -q -p no:cacheprovider -k cuda -rs tests 2>&1 | tee "$R/pytest.txt" | tail -25

echo "== 70B-shaped block, default method, 128 x 2048 tokens"
cat demo/calib.txt demo/calib.txt > "$W/calib.txt"
timeout 400 $PY tools/block_bench.py --device cuda --samples 128 --seq-len 2048 --calib "$W/calib.txt" \
    --workdir "$W" --json "$R/bench-block-70b-cuda.json"

echo "== peak GPU memory against depth, 8B-shaped blocks, 16 x 2048 tokens"
for n in 2 8; do
    timeout 200 $PY tools/block_bench.py --device cuda --layers $n --hidden 4096 --heads 32 --kv 8 \
        --intermediate 14336 --samples 16 --seq-len 2048 --workdir "$W" --json "$R/bench-depth-$n-cuda.json" \
        | grep -E '"(layers|predicted_peak_device_gib|measured_peak_cuda_gib|seconds_per_block)"' | tr -d '\n'
    echo
done

echo "== demo (stories260K, 30%), GPU and CPU"
for dev in cuda cpu; do
    timeout 200 $PY -m streamprune run --shards demo/stories260K --out "$W/demo-$dev" --calib demo/calib.txt \
        --samples 64 --seq-len 256 --sparsity 0.3 --eval demo/eval.txt --device $dev --quiet --restart \
        && cp "$W/demo-$dev/report.json" "$R/demo-$dev.json" && summary "$R/demo-$dev.json" "demo $dev"
done

if [ -n "${MODEL:-}" ]; then
    echo "== $MODEL in bf16 (30%), GPU"
    $PY -c 'import sys, torch; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T
M.from_pretrained(sys.argv[1]).to(torch.bfloat16).save_pretrained(sys.argv[2], max_shard_size="10MB")
T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])' "$MODEL" "$W/bf16"
    timeout 200 $PY -m streamprune run --shards "$W/bf16" --out "$W/bf16-out" --calib "$CALIB" --eval "$EVAL" \
        --samples 64 --seq-len 256 --sparsity 0.3 --device cuda --quiet --restart \
        && cp "$W/bf16-out/report.json" "$R/bf16-cuda.json" && summary "$R/bf16-cuda.json" "$(basename "$MODEL") bf16 cuda"
fi
