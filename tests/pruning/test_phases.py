"""Seconds per phase (phases.py): nested phases exclude each other, so a block's phases add up to
its time; a real run's report.json has them per block and in total, for the survey and the
pruning pass."""

import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from streamprune.config import RunConfig
from streamprune.engine import pipeline
from streamprune.output.report import render_report
from streamprune.pruning.phases import PhaseTimer, add_phases, phase, timed_batches
from tests.models import save_tiny_model

DEMO = Path(__file__).resolve().parents[2] / "demo"


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


def test_a_phase_is_recorded_under_its_name_and_accumulates():
    t = PhaseTimer()
    with phase(t, "gram"):
        time.sleep(0.01)
    first = t.seconds["gram"]
    assert list(t.seconds) == ["gram"] and 0.009 <= first < 0.2
    with phase(t, "gram"):
        time.sleep(0.01)
    assert t.seconds["gram"] >= first + 0.009 and t.stack == []


def test_a_phase_that_raises_still_counts_and_closes():
    t = PhaseTimer()
    with t.phase("outer"):
        with pytest.raises(ValueError), t.phase("inner"):
            time.sleep(0.01)
            raise ValueError("boom")
    assert t.seconds["inner"] >= 0.009 and t.seconds["outer"] < t.seconds["inner"] and t.stack == []


def test_rounded_sorts_names_and_keeps_three_decimals():
    t = PhaseTimer()
    t.seconds.update(write=0.12345, cache_read=1.0006, a=0.0)
    assert list(t.rounded().items()) == [("a", 0.0), ("cache_read", 1.001), ("write", 0.123)]


def test_without_a_timer_nothing_is_timed():
    assert isinstance(phase(None, "x"), nullcontext)  # no clock read, nothing recorded
    with pytest.raises(KeyError), phase(None, "x"):  # and errors pass through untouched
        {}["y"]
    batches = [torch.zeros(1), torch.ones(2)]
    got = list(timed_batches(iter(batches), None))
    assert len(got) == 2 and all(a is b for a, b in zip(got, batches))


def test_timed_batches_count_producing_each_batch():
    def slow():
        for i in range(3):
            time.sleep(0.01)
            yield torch.zeros(i)
    t = PhaseTimer()
    assert [len(x) for x in timed_batches(slow(), t)] == [0, 1, 2]
    assert list(t.seconds) == ["cache_read"] and 0.025 <= t.seconds["cache_read"] < 0.5
    with t.phase("forward"):  # the consumer's work is not counted as producing batches
        for _ in timed_batches(iter([torch.zeros(1)]), t, name="cache_read_2"):
            time.sleep(0.02)
    assert t.seconds["cache_read_2"] < 0.01 and t.seconds["forward"] >= 0.019


def test_add_phases_skips_what_is_not_a_number():
    assert add_phases({"a": 1.0}, {"a": 0.5, "b": 2, "c": "x", "d": True}) == {"a": 1.5, "b": 2}
    assert add_phases({}, ["not", "a", "dict"]) == {}


@pytest.mark.slow
def test_report_has_phases_per_block_and_in_total(tmp_path):
    src = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=DEMO / "stories260K")
    report = pipeline.run(RunConfig(shards=src, out=tmp_path / "out", sparsity=0.3, calib=DEMO / "calib.txt",
                                    samples=2, seq_len=16, progress=False, profile=True))
    timing = report["timing"]
    for b in timing["blocks"]:
        assert {"to_device", "cache_read", "output_forward", "cache_write", "compensation_solve"} <= set(b["phases"])
        # a block's seconds are its own work and waits; the threads' reads and writes run beside
        own = sum(v for k, v in b.items() if k.endswith("_seconds") and k not in ("read_seconds", "write_seconds"))
        assert b["seconds"] == pytest.approx(own, abs=2e-3) and b["seconds"] > 0
    survey, prune = timing["phases"]["survey"], timing["phases"]["prune"]
    assert {"shard_read", "dense_forward", "survey_gram", "survey_heads", "obs_factor", "obs_greedy",
            "cache_write"} <= set(survey)
    assert {"shard_read", "shard_write", "obs_gram", "output_forward"} <= set(prune)
    assert prune["output_forward"] == round(sum(b["phases"]["output_forward"] for b in timing["blocks"]), 3)
    for phase_name, key in (("shard_read", "read_seconds"), ("shard_write", "write_seconds")):
        assert prune[phase_name] == round(sum(b[key] for b in timing["blocks"]), 3)
    # the yardstick: one dense streaming pass, the survey's reads, forwards and cache writes
    one = sum(survey.get(k, 0.0) for k in ("shard_read", "to_device", "cache_read", "dense_forward", "cache_write"))
    assert timing["dense_pass_seconds"] == pytest.approx(one, abs=2e-3) and 0 < one < timing["seconds"]
    assert timing["dense_passes"] == round(timing["seconds"] / timing["dense_pass_seconds"], 2) > 1
    assert " dense passes (one: " in render_report(report)


@pytest.mark.slow
def test_a_run_without_a_survey_has_no_dense_pass_yardstick(tmp_path):
    src = save_tiny_model(tmp_path / "in", "llama", layers=1, vocab=512, tokenizer_from=DEMO / "stories260K")
    report = pipeline.run(RunConfig(shards=src, out=tmp_path / "out", sparsity=0.3, calib=DEMO / "calib.txt",
                                    samples=2, seq_len=16, progress=False, allocation="rule"))
    assert "dense_passes" not in report["timing"] and "dense passes" not in render_report(report)
