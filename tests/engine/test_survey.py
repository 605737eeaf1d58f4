"""The survey (engine/survey.py), through a real survey-only run of a tiny model: one journaled
survey record per block, block 0's inputs left in the cache, surveyed blocks never run again, the
blocks' sensitivities measured (the same after an interruption) and weighing the costs."""

import json

import pytest

import streamprune
from streamprune.engine import survey
from streamprune.pruning.costs import BlockCosts
from streamprune.pruning.sensitivity import weigh
from tests.models import TINYSTORIES, save_tiny_model

LAYERS = 3
REAL = survey.block_costs


def counting(monkeypatch, fail_at=None):
    """Count the blocks block_costs is run on; a Ctrl-C at block `fail_at`."""
    calls = []

    def block_costs(W, spec, calib, refit, write, cuts=None, held_out=True):
        calls.append(calib.generator.initial_seed())
        if len(calls) - 1 == fail_at:
            raise KeyboardInterrupt
        return REAL(W, spec, calib, refit, write, cuts, held_out)

    monkeypatch.setattr(survey, "block_costs", block_costs)
    return calls


def survey_only(model, out):
    return streamprune.prune(model, out, 0.3, TINYSTORIES / "calib.txt", samples=4, seq_len=32, survey_only=True,
                             keep_cache=True)


@pytest.fixture
def model(tmp_path):
    return save_tiny_model(tmp_path / "in", "llama", layers=LAYERS, vocab=512,
                           tokenizer_from=TINYSTORIES / "stories260K")


def journal(out):
    return json.loads((out / ".streamprune" / "journal.json").read_text())


@pytest.mark.slow
def test_one_survey_record_per_block_and_only_block_0s_inputs_stay(model, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    out = tmp_path / "out"
    result = survey_only(model, out)
    assert len(calls) == LAYERS and len(set(calls)) == LAYERS  # each block on its own seeded stream
    records = journal(out)["survey"]
    assert sorted(records) == [str(i) for i in range(LAYERS)]
    for i, record in records.items():
        assert {"heads", "neurons", "drop", "seconds", "phases", "probe"} <= set(record)
        assert record["neurons"][0] == [96, 0.0] and record["drop"] > 0
        assert len(record["probe"]) == 2 and all(c > 0 for c in record["probe"])
    kl = records[str(LAYERS - 1)]["sensitivity"]  # per block (heads, mlp), measured at the output
    assert len(kl) == LAYERS and all(len(k) == 2 and k[0] > 0 and k[1] > 0 for k in kl)
    ordered = [records[str(i)] for i in range(LAYERS)]
    sens = survey.measured_sensitivities(ordered)
    assert result.costs == weigh([BlockCosts.from_json(r) for r in ordered], sens)
    assert result.costs != [BlockCosts.from_json(r) for r in ordered]
    assert journal(out)["blocks"] == {}  # nothing pruned
    cache = out / ".streamprune" / "cache"
    assert sorted(p.name for p in cache.glob("*.f32*")) == ["inputs-00000.f32"]

    again = survey_only(model, out)  # everything surveyed: no block runs again
    assert len(calls) == LAYERS and again.costs == result.costs


@pytest.mark.slow
def test_a_resumed_survey_runs_only_the_blocks_not_surveyed(model, tmp_path, monkeypatch):
    calls = counting(monkeypatch, fail_at=1)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        survey_only(model, out)
    assert sorted(journal(out)["survey"]) == ["0"]
    calls = counting(monkeypatch)
    survey_only(model, out)
    assert len(calls) == LAYERS - 1  # blocks 1 and 2 only
    assert sorted(journal(out)["survey"]) == [str(i) for i in range(LAYERS)]
    # the probe streams resumed from block 0's file: the same costs and sensitivities as without a stop
    whole = tmp_path / "whole"
    survey_only(model, whole)

    def measured(o):
        return {i: {k: v for k, v in r.items() if k not in ("seconds", "phases")}
                for i, r in journal(o)["survey"].items()}
    assert measured(out) == measured(whole)
