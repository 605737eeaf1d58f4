"""Seconds per phase (phases.py): nested phases exclude each other, so a block's phases add up to
its time; a real run's report.json has them per block and in total, for the survey and the
pruning pass."""

import time
from pathlib import Path

import pytest
import torch

from streamprune import pipeline
from streamprune.config import RunConfig
from streamprune.report import render_report
from streamprune.phases import PhaseTimer, add_phases, phase, timed_batches
from tests.models import save_tiny_model

DEMO = Path(__file__).resolve().parents[1] / "demo"


def test_nested_phases_are_exclusive():
    t = PhaseTimer()
    t0 = time.perf_counter()
    with t.phase("outer"):
        time.sleep(0.02)
        with t.phase("inner"):
            time.sleep(0.03)
        with t.phase("inner"):
            time.sleep(0.01)
    total = time.perf_counter() - t0
    assert 0.035 <= t.seconds["inner"] < 0.2 and 0.015 <= t.seconds["outer"] < 0.2
    assert abs(t.seconds["outer"] + t.seconds["inner"] - total) < 0.01


def test_without_a_timer_nothing_is_timed():
    with phase(None, "x"):
        pass
    assert list(timed_batches(iter([1, 2]), None)) == [1, 2]


def test_timed_batches_count_producing_each_batch():
    def slow():
        for i in range(3):
            time.sleep(0.01)
            yield torch.zeros(i)
    t = PhaseTimer()
    assert [len(x) for x in timed_batches(slow(), t)] == [0, 1, 2]
    assert t.seconds["cache_read"] >= 0.025


def test_add_phases_skips_what_is_not_a_number():
    assert add_phases({"a": 1.0}, {"a": 0.5, "b": 2, "c": "x", "d": True}) == {"a": 1.5, "b": 2}
    assert add_phases({}, ["not", "a", "dict"]) == {}


def test_report_has_phases_per_block_and_in_total(tmp_path):
    src = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=DEMO / "stories260K")
    report = pipeline.run(RunConfig(shards=src, out=tmp_path / "out", sparsity=0.3, calib=DEMO / "calib.txt",
                                    samples=2, seq_len=16, progress=False, profile=True))
    timing = report["timing"]
    for b in timing["blocks"]:
        assert {"to_device", "cache_read", "output_forward", "cache_write", "compensation_solve"} <= set(b["phases"])
        assert b["write_seconds"] >= 0
    survey, prune = timing["phases"]["survey"], timing["phases"]["prune"]
    assert {"shard_read", "dense_forward", "survey_gram", "survey_heads", "obs_factor", "obs_greedy", "cache_write"} <= set(survey)
    assert {"shard_read", "shard_write", "obs_gram", "output_forward"} <= set(prune)
    assert prune["output_forward"] == round(sum(b["phases"]["output_forward"] for b in timing["blocks"]), 3)
    # the yardstick: one dense streaming pass, the survey's reads, forwards and cache writes
    one = sum(survey.get(k, 0.0) for k in ("shard_read", "to_device", "cache_read", "dense_forward", "cache_write"))
    assert timing["dense_pass_seconds"] == pytest.approx(one, abs=2e-3) and 0 < one < timing["seconds"]
    assert timing["dense_passes"] == round(timing["seconds"] / timing["dense_pass_seconds"], 2) > 1
    assert " dense passes (one: " in render_report(report)


def test_a_run_without_a_survey_has_no_dense_pass_yardstick(tmp_path):
    src = save_tiny_model(tmp_path / "in", "llama", layers=1, vocab=512, tokenizer_from=DEMO / "stories260K")
    report = pipeline.run(RunConfig(shards=src, out=tmp_path / "out", sparsity=0.3, calib=DEMO / "calib.txt",
                                    samples=2, seq_len=16, progress=False, allocation="rule"))
    assert "dense_passes" not in report["timing"] and "dense passes" not in render_report(report)
