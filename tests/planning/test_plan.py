"""The plan: sizes parse, the micro-batch shrinks to fit the memory limit, runs that cannot fit
are refused up front with the breakdown and what would fit, the prediction is not below what a
run really uses; `plan` answers memory and disk for a GPU that is not here, prints the whole
prediction when a run does not fit (exit 1) with changes that really fit, checks free disk, says
the CPU activation cap and a --max-memory beyond the machine."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from streamprune.arch.model import open_model
from streamprune.cli import main
from streamprune.config import RunConfig
from streamprune.engine import checked, pipeline
from streamprune.engine.checked import calibration_tokens
from streamprune.errors import StreamPruneError
from streamprune.planning.plan import activation_bytes, make_plan, one_thread_passes, run_passes, stage_bytes
from streamprune.planning.timing import HIGH, LOW, block_flops, duration, estimate_time, find_gpu, measure_block_rate
from streamprune.pruning.shape import rule_shape
from streamprune.units import parse_bytes
from tests.models import DEVICES, save_header_only_model, save_tiny_model

DEMO = Path(__file__).resolve().parents[2] / "demo"


def three_rates(spec, seq_len, device, **how):
    return [1e9, 2e9, 4e9]


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5g") == int(1.5 * 2**30)
    with pytest.raises(StreamPruneError):
        parse_bytes("lots")


def test_micro_batch_shrinks_with_the_memory_limit():
    model = open_model(DEMO / "stories260K")
    sizes = rule_shape(model, 0.3).sizes[0]
    roomy = make_plan(model, sizes, 64, 256, "cpu", 0.3, max_memory=8 * 2**30)
    tight = make_plan(model, sizes, 64, 256, "cpu", 0.3, max_memory=1000 * 2**20)
    assert roomy.fits and tight.fits and tight.micro_batch < roomy.micro_batch == 64
    assert not make_plan(model, sizes, 64, 256, "cpu", 0.3, max_memory=600 * 2**20).fits


def test_run_refuses_up_front_when_it_cannot_fit(tmp_path):
    cfg = RunConfig(shards=DEMO / "stories260K", out=tmp_path / "out", calib=DEMO / "calib.txt", samples=4,
                    seq_len=64, max_memory=300 * 2**20, progress=False)
    with pytest.raises(StreamPruneError, match=r"needs about .* of host memory with micro-batch 1 \(weights .*"
                                               r"process 700.0 MiB\), 300.0 MiB available .*it would fit with "
                                               r"--max-memory [\d.]+[GM]iB") as refused:
        pipeline.run(cfg)
    assert not (tmp_path / "out").exists()
    suggested = re.search(r"--max-memory ([\d.]+[GM]iB)", str(refused.value)).group(1)
    assert checked.memory_plan(replace(cfg, max_memory=parse_bytes(suggested)), open_model(cfg.shards)).fits


@pytest.mark.slow
def test_prediction_covers_the_measured_peak(tmp_path):
    """In a fresh process, as users run it (peak RSS is per process)."""
    subprocess.run([sys.executable, "-m", "streamprune", "run", "--shards", DEMO / "stories260K", "--out",
                    tmp_path / "out", "--calib", DEMO / "calib.txt", "--samples", "8", "--seq-len", "128",
                    "--quiet"], check=True, env=dict(os.environ, PYTHONPATH=str(DEMO.parent)))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    model = open_model(DEMO / "stories260K")
    predicted = make_plan(model, rule_shape(model, 0.3).sizes[0], 8, 128, "cpu", 0.3)
    assert predicted.peak_host_bytes >= report["timing"]["peak_rss_bytes"]


@pytest.mark.slow
def test_peak_rss_is_the_runs_own_not_its_parents():
    """getrusage's ru_maxrss also counts the parent's memory at the moment it spawned the process (a
    run launched from a large pytest or notebook process): the report takes VmHWM instead."""
    big = bytearray(800 * 2**20)
    big[::4096] = b"\1" * len(big[::4096])  # resident
    code = ("import resource; from streamprune.engine.run_report import peak_rss_bytes; "
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(DEMO.parent))).stdout.split()
    own, with_parent = int(out[0]), int(out[1])
    assert with_parent > len(big) > own
    del big


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES[1:])
def test_gpu_prediction_covers_the_measured_gpu_peak(tmp_path, device):
    src = save_tiny_model(tmp_path / "bf16", "llama", layers=2, hidden=256, heads=8, kv=2, intermediate=768,
                          vocab=512, dtype=torch.bfloat16, tokenizer_from=DEMO / "stories260K")
    cfg = RunConfig(shards=src, out=tmp_path / "out", calib=DEMO / "calib.txt", samples=16, seq_len=512,
                    device=device, progress=False)
    torch.cuda.reset_peak_memory_stats()
    report = pipeline.run(cfg)
    model = open_model(src)
    sizes = rule_shape(model, cfg.sparsity).sizes[0]
    scoring, compensation = stage_bytes(cfg, model, sizes)
    predicted = make_plan(model, sizes, 16, 512, device, cfg.sparsity, batch_size=report["timing"]["micro_batch"],
                          scoring_bytes=scoring, compensation_bytes=compensation)
    assert predicted.peak_device_bytes >= report["timing"]["peak_cuda_bytes"]


def test_gpu_plan_counts_activations_in_the_compute_dtype_without_attention_scores(tmp_path):
    """No GPU needed: the plan is arithmetic (bf16 activations; fused attention holds no scores)."""
    model = open_model(save_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16))
    sizes = rule_shape(model, 0.3).sizes[0]
    gpu = make_plan(model, sizes, 4, 256, "cuda", 0.3, max_memory=2**30, batch_size=4)
    act = activation_bytes(model.arch.blocks[0], 256, 4, itemsize=2, scores=False)
    assert gpu.peak_device_bytes - gpu.resident_bytes - gpu.keep_mlp_bytes == pytest.approx(
        gpu.block_compute_bytes * 1.7 + act)
    assert act < activation_bytes(model.arch.blocks[0], 256, 4) / 2


def test_a_gpu_with_room_keeps_a_blocks_activations_on_it_between_passes(tmp_path):
    """Beside the peak, where the GPU has room: the block's inputs and dense outputs and the next
    block's inputs (3 x windows x tokens x hidden, bf16 here); none where it has not, none on a CPU."""
    model = open_model(save_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16))
    sizes, hidden = rule_shape(model, 0.3).sizes[0], model.arch.hidden
    roomy = make_plan(model, sizes, 64, 256, "cuda", 0.3, max_memory=2**30, batch_size=4, check_host=False)
    assert roomy.resident_bytes == 3 * 64 * 256 * hidden * 2
    assert {c.name: c.bytes for c in roomy.breakdown}["resident"] == roomy.resident_bytes
    without = roomy.peak_device_bytes - roomy.resident_bytes - roomy.keep_mlp_bytes
    tight = make_plan(model, sizes, 64, 256, "cuda", 0.3, max_memory=int(without / 0.9) + 1, batch_size=4,
                      check_host=False)
    assert tight.fits and tight.resident_bytes == tight.keep_mlp_bytes == 0 and tight.peak_device_bytes == without
    assert not {"resident", "kept_mlp"} & {c.name for c in tight.breakdown}
    assert make_plan(model, sizes, 64, 256, "cpu", 0.3, max_memory=2**30).resident_bytes == 0


def test_plan_command_prints_disk_memory_and_time():
    r = CliRunner().invoke(main, ["plan", "--shards", str(DEMO / "stories260K"), "--samples", "8", "--seq-len", "64"])
    assert r.exit_code == 0, r.output
    assert "activation cache" in r.output and "peak host" in r.output and "time: about" in r.output
    assert re.search(r"time: about [\d.]+ s \(from [\d.]+ s to [\d.]+ (s|min)\)\n"
                     r"  work: [\d.]+ dense passes over 8 x 64 tokens "
                     r"\(survey [\d.]+, scoring [\d.]+, compensation [\d.]+, output [\d.]+\); "
                     r"[\d.]+ if no block loses heads\n"
                     r"  how: .* 3 timed block forwards", r.output)
    assert r.output.endswith("verdict: fits\n")



STORIES = str(DEMO / "stories260K")  # replaced by its long-window copy below


@pytest.fixture(scope="module", autouse=True)
def long_window_stories(tmp_path_factory):
    """The demo model with max_position_embeddings 4096, so plans of 2048-token windows (the
    default) are ones run would accept: its own 512 caps them."""
    global STORIES
    folder = tmp_path_factory.mktemp("plan") / "stories260K"
    shutil.copytree(DEMO / "stories260K", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=4096)))
    STORIES = str(folder)
NO_GPU_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU that is not on this machine")
COMPONENTS = ("weights", "prefetch and write", "activations", "scoring", "compensation", "embedding rows", "process")


def plan(*args, timing: bool = False):
    return CliRunner().invoke(main, ["plan", "--shards", STORIES, *(() if timing else ("--no-timing",)),
                                     *map(str, args)])


def plan_json(*args) -> dict:
    r = plan(*args, "--json")
    assert r.exit_code in (0, 1), r.output
    info = json.loads(r.stdout)
    assert r.exit_code == (0 if info["fits"] else 1)  # a script can tell from the exit code alone
    return info


@NO_GPU_HERE
def test_plan_for_a_cuda_gpu_that_is_not_here(tmp_path):
    r = plan("--device", "cuda", "--max-memory", "24GiB", "--samples", 8, "--seq-len", 64, "--out", tmp_path / "out",
             timing=True)
    assert r.exit_code == 0, r.output
    assert "peak GPU: " in r.output and "of 24.00 GiB (--max-memory" in r.output and "verdict: fits" in r.output
    assert f"{tmp_path}: needs " in r.output and "time: not measured here" in r.output
    assert not (tmp_path / "out").exists()  # plan writes nothing
    info = plan_json("--device", "cuda", "--max-memory", "24GiB", "--samples", 8, "--seq-len", 64)
    assert info["peak_device_bytes"] > 0 and not info["device_here"] and info["host_limit_bytes"] is None


@NO_GPU_HERE
def test_plan_for_cuda_needs_the_gpu_described():
    r = plan("--device", "cuda")
    assert r.exit_code == 2 and "describe the one to plan for with --max-memory" in r.stderr, r.output


def test_plan_for_a_known_gpu_uses_its_datasheet():
    r = plan("--gpu", "RTX 4090", "--samples", 8, "--seq-len", 64, timing=True)
    assert r.exit_code == 0, r.output
    assert ("plan for RTX 4090 (datasheet numbers)" in r.output
            and "of 24.00 GiB (the GPU's datasheet memory" in r.output)
    assert "time: at least" in r.output and "datasheet peak of 165 TFLOP/s" in r.output
    assert find_gpu("a100-80gb").memory_bytes == 80 * 2**30
    with pytest.raises(StreamPruneError, match="'a100' is ambiguous; known: rtx-3090"):
        find_gpu("a100")


def test_a_run_that_does_not_fit_prints_the_whole_prediction_and_what_would_fit():
    r = plan("--samples", 64, "--seq-len", 2048, "--max-memory", "1GiB")
    assert r.exit_code == 1 and "error" not in r.output, r.output
    assert all(f"\n  {name} " in r.output for name in COMPONENTS), r.output
    assert "peak host: " in r.output and "DOES NOT FIT" in r.output and "verdict: does not fit" in r.output
    assert "it would fit with any one of:\n  --max-memory 1.2GiB (micro-batch 1, peak " in r.output
    assert "\n  --method magnitude (" in r.output and "\n  --device cuda --max-memory " in r.output


CASES = {  # does not fit -> the suggestions, each checked by planning again with it
    "cpu-scoring": ("--samples", 64, "--seq-len", 2048, "--max-memory", "1GiB"),
    "cpu-activations": ("--samples", 64, "--seq-len", 2048, "--max-memory", "900MiB", "--method", "magnitude",
                        "--compensate", "none"),
    "batch-size": ("--samples", 64, "--seq-len", 2048, "--max-memory", "4GiB", "--batch-size", 64),
    "gpu": ("--device", "cuda", "--max-memory", "200MiB", "--samples", 64, "--seq-len", 2048),
}


@pytest.mark.parametrize("case", CASES)
def test_each_suggestion_fits_when_applied(case):
    info = plan_json(*CASES[case])
    assert not info["fits"] and info["suggestions"]
    changes = [s["change"] for s in info["suggestions"]]
    expected = {"cpu-scoring": "--max-memory", "cpu-activations": "--seq-len", "batch-size": "--batch-size 0",
                "gpu": "--max-memory"}[case]
    assert any(c.startswith(expected) for c in changes), changes
    for change in changes:
        again = plan_json(*CASES[case], *change.split())  # click: the last value of an option wins
        assert again["fits"], (change, again["short_of"])


def test_plan_checks_free_disk(monkeypatch, tmp_path):
    free = 5 * 2**20
    monkeypatch.setattr("streamprune.checks.validate.shutil.disk_usage", lambda p: SimpleNamespace(free=free))
    args = ("--samples", 64, "--seq-len", 256, "--out", tmp_path / "out")
    r = plan(*args)
    assert r.exit_code == 1, r.output
    # the cache: 4 block boundaries of 64 x 256 x 64 fp32 (16.0 MiB; at 95 tokens per neuron the
    # survey keeps no probe streams: costs.held_out_survey)
    assert (f"{tmp_path}: needs 16.7 MiB (output 0.7 MiB, activation cache 16.0 MiB), 5.0 MiB free: "
            "DOES NOT FIT") in r.output
    info = plan_json(*args)
    assert info["memory_fits"] and not info["disk_fits"] and info["verdict"] == "does not fit"
    changes = [s["change"] for s in info["suggestions"]]
    assert f"free 11.7 MiB in {tmp_path}" in changes and "--cache-dir on a disk with 16.0 MiB free" in changes
    samples = [c for c in changes if c.startswith("--samples ")]
    assert samples == ["--samples 17"] and plan_json(*args, *samples[0].split())["fits"]  # below 2 x 64: not rounded


def test_plan_says_when_the_cpu_activation_cap_sets_the_micro_batch():
    r = plan("--samples", 64, "--seq-len", 2048, "--max-memory", "20GiB")
    assert r.exit_code == 0, r.output
    assert "memory with micro-batch 7 (capped: on a CPU a micro-batch is kept under 1.00 GiB of activations" in r.output
    assert plan_json("--samples", 64, "--seq-len", 2048, "--max-memory", "20GiB")["limited_by"] == "activation cap"


def test_plan_prints_the_warning_for_max_memory_beyond_the_machine():
    r = plan("--samples", 8, "--seq-len", 64, "--max-memory", "16384GiB")
    assert r.exit_code == 0, r.output
    assert "\nwarning: --max-memory 16384.00 GiB is more than the " in r.stdout and not r.stderr


def test_durations_read_in_hours_and_days():
    assert [duration(s) for s in (0.25, 45, 12 * 60, 6.3 * 3600, 378172 * 60)] == [
        "0.2 s", "45 s", "12 min", "6.3 h", "6303 h (262.6 days)"]


def test_time_estimate_is_the_median_of_the_timed_block_forwards_and_says_how(monkeypatch):
    monkeypatch.setattr("streamprune.planning.timing.measure_block_rate", three_rates)
    monkeypatch.setattr("streamprune.planning.timing.measure_read_speed", lambda index: 1e12)
    model = open_model(DEMO / "stories260K")
    t = estimate_time(model, 8, 64, torch.device("cpu"), 5.0)
    flops = sum(block_flops(b, 64) for b in model.arch.blocks) * 8 * 64 * 5.0
    assert t.flops == pytest.approx(flops) and t.seconds == pytest.approx(flops / 2e9 + t.io_bytes / 1e12)
    assert t.low_seconds == pytest.approx(LOW * (flops / 4e9 + t.io_bytes / 1e12))
    assert t.high_seconds == pytest.approx(HIGH * (flops / 1e9 + t.io_bytes / 1e12))
    assert "5.0 dense passes" in t.how and "1-4 GFLOP/s of 3 timed block forwards" in t.how


def test_time_range_spans_the_fewest_passes_at_the_fastest_to_the_most_at_the_slowest(monkeypatch):
    monkeypatch.setattr("streamprune.planning.timing.measure_block_rate", three_rates)
    monkeypatch.setattr("streamprune.planning.timing.measure_read_speed", lambda index: 1e12)
    model = open_model(DEMO / "stories260K")
    t = estimate_time(model, 8, 64, torch.device("cpu"), 5.0, fewest_passes=3.0)
    one, io = t.flops / 5.0, t.io_bytes / 1e12
    assert t.seconds == pytest.approx(one * 4.0 / 2e9 + io)
    assert t.low_seconds == pytest.approx(LOW * (one * 3.0 / 4e9 + io))
    assert t.high_seconds == pytest.approx(HIGH * (one * 5.0 / 1e9 + io))
    assert "3.0 to 5.0 dense passes" in t.how


def test_a_wide_block_is_timed_as_a_slice_with_its_inner_dimensions(monkeypatch, tmp_path):
    """A Llama-3-70B block: its hidden size and head_dim, one KV group, a 26th of its work per token; at most
    what the device computes in TIMED_SECONDS, and no more tokens than the run's micro-batch."""
    from streamprune.planning.timing import TIMED_SECONDS, timed_slice, timed_windows
    spec = open_model(save_header_only_model(tmp_path / "70b")).arch.blocks[0]
    part = timed_slice(spec)
    assert (part.hidden, part.head_dim, part.n_kv, part.group) == (spec.hidden, spec.head_dim, 1, spec.group)
    assert block_flops(part, 2048) < block_flops(spec, 2048) / 20
    monkeypatch.setattr("streamprune.planning.timing.measure_flops", lambda device, **how: [30e9])
    windows, window = timed_windows(part, 2048, 4 * 2048, torch.device("cpu"))
    assert windows == 1 and window == int(TIMED_SECONDS * 30e9 / block_flops(part, 2048))
    small = open_model(DEMO / "stories260K").arch.blocks[0]
    assert timed_slice(small) == small and timed_windows(small, 256, 16 * 256, torch.device("cpu")) == (16, 256)


def test_a_timed_block_forward_runs_at_a_plausible_rate():
    model = open_model(DEMO / "stories260K")
    rates = measure_block_rate(model.arch.blocks[0], 64, torch.device("cpu"), rounds=2, batch_tokens=256)
    assert len(rates) == 2 and all(1e6 < r < 1e14 for r in rates)


def test_the_plan_counts_the_survey_and_the_passes_of_the_method(tmp_path):
    model = open_model(DEMO / "stories260K")
    cfg = RunConfig(shards=model.folder, out=tmp_path / "o", samples=16, seq_len=64, sparsity=0.3)
    default = run_passes(cfg, model)
    assert (set(default) == {"survey", "scoring", "compensation", "output"}
            and 0 < default["compensation"] < default["scoring"])
    assert default["survey"] > 1 and default["scoring"] > 1 and default["output"] == pytest.approx(0.7)
    assert "survey" not in run_passes(dataclasses.replace(cfg, allocation="rule"), model)
    wanda = run_passes(dataclasses.replace(cfg, method="wanda-sp"), model)
    assert wanda["compensation"] == 2.0 and wanda["scoring"] == 1.0
    assert run_passes(dataclasses.replace(cfg, compensate="none"), model)["output"] == pytest.approx(1.7)
    fewest = run_passes(cfg, model, heads_cut=False)
    assert fewest["compensation"] == 0 and fewest["scoring"] < default["scoring"]
    # the perturbations' sample is a fixed number of tokens: more windows, fewer passes for it
    assert run_passes(dataclasses.replace(cfg, samples=256), model)["scoring"] < default["scoring"]
    # with the last MLP pass's activations kept, the output pass is down_proj alone
    assert run_passes(cfg, model, keep_mlp=True)["output"] < 0.25 * default["output"]
    # the range's slow end: the survey's curve (with its held-out ridges: 5/24 more) and perturb's OBS
    # factorized on one thread (on a CPU)
    both = one_thread_passes(cfg, model)
    survey = one_thread_passes(dataclasses.replace(cfg, method="wanda-sp"), model)
    assert both > 0 and survey == pytest.approx(both * (1 + 5 / 24) / (2 + 5 / 24))
    assert one_thread_passes(dataclasses.replace(cfg, allocation="rule", method="wanda-sp"), model) == 0
    assert one_thread_passes(dataclasses.replace(cfg, device="cuda"), model) == 0


def test_plan_fits_the_windows_to_the_calibration_text_as_run_does(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text((DEMO / "calib.txt").read_text()[:20000])
    info = json.loads(plan("--calib", text, "--json", "--out", tmp_path / "o").stdout)
    cfg, _ = calibration_tokens(RunConfig(shards=Path(STORIES), out=tmp_path / "o", calib=text,
                                          adaptable=("samples", "seq_len")), open_model(STORIES))
    assert (info["samples"], info["seq_len"]) == (cfg.samples, cfg.seq_len) and cfg.samples < RunConfig.samples
    assert any(w.startswith("using --samples") for w in info["warnings"])
    rule = json.loads(plan("--calib", text, "--allocation", "rule", "--json", "--out", tmp_path / "o").stdout)
    assert "survey" in info["passes"] and "survey" not in rule["passes"]


def test_plan_json_carries_the_breakdown_disk_verdict_and_time():
    info = plan_json("--samples", 8, "--seq-len", 64)
    # (with room to spare, the MLP activations the output pass reuses)
    assert [c["name"] for c in info["breakdown"]] == [n.replace(" ", "_") for n in COMPONENTS] + ["kept_mlp"]
    assert info["verdict"] == "fits" and info["disk"][0]["fits"] and info["suggestions"] == []
    assert info["time"] is None  # --no-timing
    timed = json.loads(plan("--samples", 8, "--seq-len", 64, "--json", timing=True).stdout)
    t = timed["time"]
    assert t["low_seconds"] <= t["seconds"] <= t["high_seconds"] and len(t["flops_per_second"]) == 3 and t["how"]


@pytest.mark.parametrize("cap_gib, grams_on", [(24, "device"), (16, "host"), (8, "host")])
def test_70b_block_fits_consumer_gpu_caps(tmp_path, cap_gib, grams_on):
    """One Llama-3-70B-shaped block (bf16, header only) at the default method and compensation,
    128 x 2048 tokens: at 24 GiB the Gram matrices (OBS: three 28672^2 fp32; the down_proj refit at
    survey sizes) stay on the GPU; at 16 and 8 GiB they go to the host and the GPU holds weights,
    a micro-batch and column blocks. The host is planned as a 128 GiB machine."""
    model = open_model(save_header_only_model(tmp_path / "70b"))
    sizes = rule_shape(model, 0.3).sizes[0]
    cfg = RunConfig(shards=model.folder, out=tmp_path / "out", device="cuda")
    scoring, compensation = stage_bytes(cfg, model, sizes)
    assert scoring > 3 * 4 * 28672**2 and compensation > 2 * 4 * 28672**2  # OBS; the refit of all neurons (fp32)
    p = make_plan(model, sizes, 128, 2048, "cuda", 0.3, max_memory=cap_gib * 2**30, scoring_bytes=scoring,
                  compensation_bytes=compensation, host_memory=128 * 2**30)
    assert p.fits and p.grams_on == grams_on and p.peak_device_bytes <= 0.9 * cap_gib * 2**30
    host_grams = [c for c in p.breakdown if c.name == "host_grams"]
    if grams_on == "host":
        assert p.placement.host and 64 <= p.gram_chunk_columns < 28672
        assert host_grams[0].bytes == max(scoring, compensation)
        assert 12 * 28672 * p.gram_chunk_columns <= 256 * 2**20  # a column block's fp32 product and fp64 copy
        assert p.peak_host_bytes > max(scoring, compensation)
    else:
        assert not host_grams and not p.placement.host and p.peak_device_bytes > max(scoring, compensation)


def test_plan_says_where_the_grams_go(tmp_path):
    folder = save_header_only_model(tmp_path / "70b")
    r = CliRunner().invoke(main, ["plan", "--shards", str(folder), "--device", "cuda", "--max-memory", "16GiB",
                                  "--samples", "8", "--seq-len", "2048", "--no-timing", "--out", str(tmp_path / "o")])
    assert "formed" in r.output and "columns at a time on the GPU" in r.output, r.output


@pytest.mark.slow
def test_host_grams_give_the_same_pruned_model(tmp_path, monkeypatch):
    """The host path on a CPU, forced as if the device budget were small: Gram matrices formed 7
    columns at a time and factored where the host keeps them give the tensors of the default path."""
    from safetensors.torch import load_file

    from streamprune.planning import plan
    from streamprune.pruning.numerics import GramPlacement
    src = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=DEMO / "stories260K")
    outs = {}
    for name in ("device", "host"):
        if name == "host":
            monkeypatch.setattr(plan, "place_grams", lambda *a: GramPlacement(host=True, columns=7))
        report = pipeline.run(RunConfig(shards=src, out=tmp_path / name, sparsity=0.4, calib=DEMO / "calib.txt",
                                        samples=4, seq_len=32, progress=False))
        assert report["plan"]["grams_on"] == name
        outs[name] = {k: v for f in sorted((tmp_path / name).glob("model-*.safetensors"))
                      for k, v in load_file(f).items()}
    assert outs["device"].keys() == outs["host"].keys()
    for k, v in outs["device"].items():
        # (to float rounding, which a refit under a small held-out ridge amplifies: 3e-4 of the largest weight)
        torch.testing.assert_close(outs["host"][k], v, rtol=1e-4, atol=1e-3 * v.abs().max().item())


def test_plan_for_several_processes_divides_the_windows_not_the_weights(tmp_path):
    """plan --nproc N: each process caches its share of the windows; the compute on the windows
    divides, the weights' I/O and perturb's fixed token sample do not (speed-up below N)."""
    from streamprune.planning.advice import describe_plan
    from streamprune.planning.timing import speedup
    # (the fixed rule: no survey, whose probe streams process 0 alone keeps)
    cfg = RunConfig(shards=DEMO / "stories260K", out=tmp_path / "out", samples=64, seq_len=256, allocation="rule")
    one, two = describe_plan(cfg, timing=False), describe_plan(cfg, timing=False, processes=2)
    assert two["cache_bytes"] * 2 == one["cache_bytes"] and two["windows_per_process"] == 32
    assert two["block_stored_bytes"] == one["block_stored_bytes"] and two["micro_batch"] <= 32
    assert two["samples"] == 64 and "processes" not in one
    model = open_model(DEMO / "stories260K")
    s = [speedup(model, 64, 256, 6.0, 2.0, n, 1e9, 1e8) for n in (1, 2, 4)]
    assert s[0] == 1 and 1 < s[1] < s[2] < 4
    assert speedup(model, 64, 256, 6.0, 0.0, 2, 1e9) == pytest.approx(2)  # all compute, no I/O: divides
    result = CliRunner().invoke(main, ["plan", "--shards", str(DEMO / "stories260K"), "--out", str(tmp_path / "o"),
                                       "--samples", "64", "--seq-len", "256", "--nproc", "2"])
    assert result.exit_code == 0, result.output
    assert "2 processes of 32 windows" in result.output and "expected speed-up" in result.output
    with pytest.raises(StreamPruneError, match="--nproc"):
        describe_plan(cfg, timing=False, processes=65)


def test_plan_uses_runs_window_rule():
    """The default --seq-len is capped at max positions with a warning, as run caps it; one set past
    them is refused, as run refuses it."""
    r = CliRunner().invoke(main, ["plan", "--shards", str(DEMO / "stories260K"), "--no-timing", "--json"])
    info = json.loads(r.stdout)
    assert info["seq_len"] == 512 and any("max_position_embeddings is 512" in w for w in info["warnings"])
    r = CliRunner().invoke(main, ["plan", "--shards", str(DEMO / "stories260K"), "--no-timing", "--seq-len", "1024"])
    assert r.exit_code == 2 and "exceeds max_position_embeddings 512" in r.output
