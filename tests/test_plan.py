"""The plan: sizes parse, the micro-batch shrinks to fit the memory limit, runs that cannot fit
are refused up front, and the prediction is not below what a run really uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from streamprune import pipeline
from streamprune.cli import main
from streamprune.config import RunConfig
from streamprune.errors import StreamPruneError
from streamprune.model import open_model, output_shape
from streamprune.plan import activation_bytes, make_plan, parse_bytes, stage_work_bytes
from tests.models import DEVICES, save_tiny_model

DEMO = Path(__file__).resolve().parents[1] / "demo"


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
    with pytest.raises(StreamPruneError):
        parse_bytes("lots")


def test_micro_batch_shrinks_with_the_memory_limit():
    model = open_model(DEMO / "stories260K")
    sizes = output_shape(model, 0.3).sizes[0]
    roomy = make_plan(model, sizes, 64, 256, "cpu", 0.3, max_memory=8 * 2**30)
    tight = make_plan(model, sizes, 64, 256, "cpu", 0.3, max_memory=1000 * 2**20)
    assert roomy.fits and tight.fits and tight.micro_batch < roomy.micro_batch == 64
    assert not make_plan(model, sizes, 64, 256, "cpu", 0.3, max_memory=600 * 2**20).fits


def test_run_refuses_up_front_when_it_cannot_fit(tmp_path):
    cfg = RunConfig(shards=DEMO / "stories260K", out=tmp_path / "out", calib=DEMO / "calib.txt", samples=4,
                    seq_len=64, max_memory=300 * 2**20, progress=False)
    with pytest.raises(StreamPruneError, match="needs about .* GiB of host memory"):
        pipeline.run(cfg)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_prediction_covers_the_measured_peak(tmp_path):
    """In a fresh process, as users run it (peak RSS is per process)."""
    subprocess.run([sys.executable, "-m", "streamprune", "run", "--shards", DEMO / "stories260K", "--out",
                    tmp_path / "out", "--calib", DEMO / "calib.txt", "--samples", "8", "--seq-len", "128",
                    "--quiet"], check=True, env=dict(os.environ, PYTHONPATH=str(DEMO.parent)))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    model = open_model(DEMO / "stories260K")
    predicted = make_plan(model, output_shape(model, 0.3).sizes[0], 8, 128, "cpu", 0.3)
    assert predicted.peak_host_bytes >= report["timing"]["peak_rss_bytes"]


@pytest.mark.parametrize("device", DEVICES[1:])
def test_gpu_prediction_covers_the_measured_gpu_peak(tmp_path, device):
    src = save_tiny_model(tmp_path / "bf16", "llama", layers=2, hidden=256, heads=8, kv=2, intermediate=768,
                          vocab=512, dtype=torch.bfloat16, tokenizer_from=DEMO / "stories260K")
    cfg = RunConfig(shards=src, out=tmp_path / "out", calib=DEMO / "calib.txt", samples=16, seq_len=512,
                    device=device, progress=False)
    torch.cuda.reset_peak_memory_stats()
    report = pipeline.run(cfg)
    model = open_model(src)
    sizes = output_shape(model, cfg.sparsity).sizes[0]
    predicted = make_plan(model, sizes, 16, 512, device, cfg.sparsity, batch_size=report["timing"]["micro_batch"],
                          work_bytes=stage_work_bytes(cfg, model, sizes))
    assert predicted.peak_device_bytes >= report["timing"]["peak_cuda_bytes"]


def test_gpu_plan_counts_activations_in_the_compute_dtype_without_attention_scores(tmp_path):
    """No GPU needed: the plan is arithmetic (bf16 activations; fused attention holds no scores)."""
    model = open_model(save_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16))
    sizes = output_shape(model, 0.3).sizes[0]
    gpu = make_plan(model, sizes, 4, 256, "cuda", 0.3, max_memory=2**30, batch_size=4)
    act = activation_bytes(model.arch.blocks[0], 256, 4, itemsize=2, scores=False)
    assert gpu.peak_device_bytes == pytest.approx(gpu.block_compute_bytes * 1.7 + act)
    assert act < activation_bytes(model.arch.blocks[0], 256, 4) / 2


def test_plan_command_prints_disk_memory_and_time():
    r = CliRunner().invoke(main, ["plan", "--shards", str(DEMO / "stories260K"), "--samples", "8", "--seq-len", "64"])
    assert r.exit_code == 0, r.output
    assert "activation cache" in r.output and "peak host" in r.output and "time: about" in r.output
