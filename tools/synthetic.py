"""Random Llama-family models of any depth for benchmarks, written one block at a time (so a
64-layer model never needs to fit in memory), with the demo's tokenizer."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from streamprune.arch.families import architecture
from streamprune.arch.spec import EMBED, FINAL_NORM, LM_HEAD
from streamprune.store.safetensors_header import read_header
from streamprune.store.shard_writer import OutTensor, shard_name, write_safetensors

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"


def synthetic_config(layers: int, hidden: int, heads: int, kv: int, intermediate: int,
                     vocab: int = 512, family: str = "llama", dtype: str = "bfloat16") -> dict:
    return {
        "architectures": [f"{family.capitalize()}ForCausalLM"], "model_type": family,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": dtype,
    }


def write_random_model(folder: Path, config: dict, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = architecture(config)
    dtype = getattr(torch, config["dtype"])
    g = torch.Generator().manual_seed(seed)
    n = spec.n_layers + 1

    def rand(shape):
        scale = 1.0 if len(shape) == 1 else shape[-1] ** -0.5
        t = torch.randn(shape, generator=g) * scale
        return (t + 1 if len(shape) == 1 else t).to(dtype)  # norms near 1

    for layer in range(spec.n_layers):
        write_safetensors(folder / shard_name(layer + 1, n), [
            OutTensor.of(spec.layer_tensor(layer, s), rand(shape)) for s, shape in spec.blocks[layer].shapes().items()])
    write_safetensors(folder / shard_name(n, n), [
        OutTensor.of(name, rand(shape)) for name, shape in spec.expected_shapes().items()
        if name in (EMBED, FINAL_NORM, LM_HEAD)])
    weight_map = {name: shard_name(k, n) for k in range(1, n + 1) for name in read_header(folder / shard_name(k, n))}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "stories260K" / f, folder / f)
    return folder


# `python -c CAPPED BYTES run ...`: streamprune with the CUDA caching allocator capped at BYTES, so a run
# that needs more GPU memory fails with an out-of-memory error instead of passing on a larger card
CAPPED = ("import runpy, sys, torch; cap = int(sys.argv.pop(1)); "
          "torch.cuda.set_per_process_memory_fraction("
          "min(1.0, cap / torch.cuda.get_device_properties(0).total_memory)); "
          "sys.argv[0] = 'streamprune'; runpy.run_module('streamprune', run_name='__main__')")


def run_streamprune(model: Path, out: Path, *args: str, calib: Path = DEMO / "calib.txt",
                    gpu_cap_bytes: int | None = None) -> tuple[dict, float]:
    """`streamprune run` in a fresh process (so peak RSS is its own); returns report.json and wall
    seconds. `gpu_cap_bytes`: the process may allocate at most this much GPU memory."""
    launcher = ["-m", "streamprune"] if gpu_cap_bytes is None else ["-c", CAPPED, str(gpu_cap_bytes)]
    cmd = [sys.executable, *launcher, "run", "--shards", str(model), "--out", str(out),
           "--calib", str(calib), "--quiet", "--restart", *map(str, args)]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
    return json.loads((Path(out) / "report.json").read_text()), time.time() - t0


def bench_parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """The options every benchmark shares: model width, calibration size, method, output."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--method", default=None, help="default: streamprune's default")
    p.add_argument("--workdir", type=Path, help="where the temporary models go")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.set_defaults(**defaults)
    return p


def method_args(args) -> list[str]:
    return ["--method", args.method] if args.method else []


def emit(result: dict, path: Path | None) -> None:
    """Print the result as JSON (with the machine it ran on) and write it to `path` if given."""
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", **result}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
