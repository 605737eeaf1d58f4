"""journal.py: a run's resume state. Opened new or resumed (by fingerprint), values pinned at the
start stay, finished blocks, survey records and evaluations survive a reopen, a changed input or
argument is named in the refusal, and a damaged journal is one StreamPruneError."""

import json

import pytest

from streamprune.errors import StreamPruneError
from streamprune.store import journal
from streamprune.store.journal import WORKDIR, Journal, refuse_foreign_folder
from streamprune.version import __version__

FINGERPRINT = {"sparsity": 0.3, "samples": 4, "input:model.safetensors": "aa", "input:config.json": "bb"}


def record(layer: int) -> dict:
    return {"layer": layer, "heads": [8, 6], "kv_heads": [2, 2], "neurons": [96, 64], "params": [1000, 700],
            "relative_error": 0.01 * layer, "timing": {"seconds": 1.5}}


EVAL = {"text_sha256": "ff", "seq_len": 32, "windows": 3, "tokens": 93, "ppl": 5.25}


def test_open_new_then_resume(tmp_path):
    out = tmp_path / "out"
    j = Journal.open(out, FINGERPRINT, restart=False)
    assert j.path == out / WORKDIR / "journal.json"
    state = json.loads(j.path.read_text())
    assert state.pop("wall_seconds") >= 0
    assert state == {"fingerprint": FINGERPRINT, "blocks": {}, "complete": False, "version": __version__}
    assert j.next_block == 0 and not j.complete
    j.finish_block(0, record(0))
    again = Journal.open(out, dict(FINGERPRINT), restart=False)
    assert again.record(0) == record(0) and again.next_block == 1
    fresh = Journal.open(out, FINGERPRINT, restart=True)  # --restart: a new journal
    assert fresh.next_block == 0 and fresh.record(0) is None
    fresh.finish()
    assert Journal.open(out, FINGERPRINT, restart=False).complete


def test_pin_keeps_the_first_value(tmp_path):
    j = Journal.open(tmp_path, FINGERPRINT, restart=False)
    assert j.pin("micro_batch", 4) == 4
    assert j.pin("micro_batch", 8) == 4
    assert j.pin("run", "abc") == "abc"
    resumed = Journal.open(tmp_path, FINGERPRINT, restart=False)
    assert resumed.pin("micro_batch", 16) == 4 and resumed.pin("run", "xyz") == "abc"


def test_finished_blocks_and_the_next_one(tmp_path):
    j = Journal.open(tmp_path, FINGERPRINT, restart=False)
    j.finish_block(0, record(0))
    j.finish_block(2, record(2))
    assert j.next_block == 1  # the first block not finished
    j.finish_block(1, record(1))
    assert j.next_block == 3
    resumed = Journal.open(tmp_path, FINGERPRINT, restart=False)
    assert resumed.next_block == 3 and [resumed.record(i) for i in range(3)] == [record(i) for i in range(3)]
    assert resumed.record(3) is None


def test_survey_records(tmp_path):
    j = Journal.open(tmp_path, FINGERPRINT, restart=False)
    assert j.surveyed == {}
    j.finish_survey_block(0, {"costs": [1.0, 2.0]})
    j.finish_survey_block(1, {"costs": [3.0]})
    assert Journal.open(tmp_path, FINGERPRINT, restart=False).surveyed == {"0": {"costs": [1.0, 2.0]},
                                                                         "1": {"costs": [3.0]}}
    assert j.next_block == 0  # surveyed blocks are not pruned blocks


def test_eval_results(tmp_path):
    j = Journal.open(tmp_path, FINGERPRINT, restart=False)
    assert j.eval_result("before") is None
    j.record_eval("before", EVAL)
    resumed = Journal.open(tmp_path, FINGERPRINT, restart=False)
    assert resumed.eval_result("before") == EVAL and resumed.eval_result("after") is None
    resumed.record_eval("after", dict(EVAL, ppl=9.5))
    assert Journal.open(tmp_path, FINGERPRINT, restart=False).eval_result("after")["ppl"] == 9.5


def test_mismatch_names_changed_inputs_or_arguments(tmp_path):
    inputs = journal.mismatch(tmp_path, FINGERPRINT, dict(FINGERPRINT, **{"input:model.safetensors": "cc",
                                                                            "sparsity": 0.5}))
    assert isinstance(inputs, StreamPruneError)
    assert "the input model changed" in str(inputs) and "(model.safetensors)" in str(inputs)
    assert "sparsity" not in str(inputs)  # the input is what to restore first
    removed = journal.mismatch(tmp_path, FINGERPRINT,
                               {k: v for k, v in FINGERPRINT.items() if k != "input:config.json"})
    assert "(config.json)" in str(removed)
    args = journal.mismatch(tmp_path, FINGERPRINT, dict(FINGERPRINT, sparsity=0.5, samples=8))
    assert "different arguments (samples, sparsity)" in str(args) and "input model" not in str(args)
    assert "--restart" in str(args) and "--restart" in str(inputs)


def test_open_refuses_another_fingerprint(tmp_path):
    Journal.open(tmp_path, FINGERPRINT, restart=False).finish_block(0, record(0))
    with pytest.raises(StreamPruneError, match=r"different arguments \(sparsity\)"):
        Journal.open(tmp_path, dict(FINGERPRINT, sparsity=0.4), restart=False)
    with pytest.raises(StreamPruneError, match=r"input model changed .*\(config.json\)"):
        Journal.open(tmp_path, dict(FINGERPRINT, **{"input:config.json": "zz"}), restart=False)


@pytest.mark.parametrize("work", ["none", "pinned", "block", "survey", "eval"])
def test_a_run_that_did_no_work_pins_nothing(tmp_path, work):
    """A run refused after its journal was written (not enough disk) is replaced by the corrected
    command; one that did any work (a pruned or surveyed block, a perplexity) is not."""
    j = Journal.open(tmp_path, FINGERPRINT, restart=False)
    j.pin("micro_batch", 4)
    do = {"block": lambda: j.finish_block(0, record(0)), "survey": lambda: j.finish_survey_block(0, {"costs": []}),
          "eval": lambda: j.record_eval("before", EVAL)}.get(work)
    if do:
        do()
        with pytest.raises(StreamPruneError, match=r"different arguments \(sparsity\)"):
            Journal.open(tmp_path, dict(FINGERPRINT, sparsity=0.4), restart=False)
        return
    fresh = Journal.open(tmp_path, dict(FINGERPRINT, sparsity=0.4), restart=False)
    assert fresh.pin("micro_batch", 8) == 8 and fresh.state["fingerprint"]["sparsity"] == 0.4


def test_time_adds_up_over_sessions(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(journal.time, "time", lambda: clock[0])
    j = Journal.open(tmp_path, FINGERPRINT, restart=False, started=990.0)  # 10 s before the journal
    assert j.start_session() == 1
    clock[0] += 30
    j.finish_block(0, record(0))
    clock[0] += 500  # killed: what it did after its last save is lost
    resumed = Journal.open(tmp_path, FINGERPRINT, restart=False, started=clock[0])
    assert resumed.wall_seconds == 40 and resumed.start_session() == 2
    clock[0] += 20
    assert resumed.wall_seconds == 60
    resumed.finish()
    assert Journal.open(tmp_path, FINGERPRINT, restart=False, started=clock[0] + 5).state["wall_seconds"] == 60


def test_refuse_foreign_folder(tmp_path):
    refuse_foreign_folder(tmp_path / "new")  # not there
    (tmp_path / "empty").mkdir()
    refuse_foreign_folder(tmp_path / "empty")
    (tmp_path / "work-only" / WORKDIR).mkdir(parents=True)  # only a (journal-less) work folder
    (tmp_path / "work-only" / "streamprune.log").write_text("")  # and the log of a run that was refused
    refuse_foreign_folder(tmp_path / "work-only")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(StreamPruneError, match="is not empty and is not a streamprune output"):
        refuse_foreign_folder(user)
    with pytest.raises(StreamPruneError, match="not a streamprune output"):
        Journal.open(user, FINGERPRINT, restart=False)
    assert not (user / WORKDIR).exists()
    ours = tmp_path / "ours"
    Journal.open(ours, FINGERPRINT, restart=False)
    (ours / "config.json").write_text("{}")  # an output with its files and its journal
    refuse_foreign_folder(ours)


@pytest.mark.parametrize("content,problem", [
    (b"[]", "the journal is an array, not an object"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b'{"fingerprint": {}, "blocks": {}', "not valid JSON"),
    (b'{"fingerprint": {}, "blocks": {}, "complete": 1}', "'complete' is an integer, not a boolean"),
    (b'{"fingerprint": {}, "blocks": {"0": {"layer": 1}}, "complete": false}', "block 0 has no 'heads'"),
])
def test_a_damaged_journal_is_one_error(tmp_path, content, problem):
    Journal.open(tmp_path, FINGERPRINT, restart=False)
    (tmp_path / WORKDIR / "journal.json").write_bytes(content)
    with pytest.raises(Exception) as e:
        Journal.open(tmp_path, FINGERPRINT, restart=False)
    assert type(e.value) is StreamPruneError
    message = str(e.value)
    assert "is damaged (journal.json: " in message and problem in message and "--restart" in message
    assert "\n" not in message
    Journal.open(tmp_path, FINGERPRINT, restart=True)  # --restart gets past it


def test_gram_placement_round_trips_through_the_journal_form():
    from streamprune.pruning.numerics import ON_DEVICE, GramPlacement
    for p in (ON_DEVICE, GramPlacement(host=True, columns=4096)):
        assert GramPlacement.of(p.as_dict()) == p


def test_damaged_gram_placement_is_refused():
    from streamprune.store.journal import check_state
    from streamprune.store.records import Damaged
    state = {"fingerprint": {}, "blocks": {}, "complete": False}
    check_state(dict(state, grams={"grams_on": "host", "gram_chunk_columns": 0}))
    for bad in ({"grams_on": "gpu", "gram_chunk_columns": 0}, {"grams_on": "host"},
                {"grams_on": "host", "gram_chunk_columns": -1}):
        with pytest.raises(Damaged):
            check_state(dict(state, grams=bad))


def surveyed_run(out, fingerprint=FINGERPRINT, layers=2, **state):
    """A run in `out` that surveyed `layers` blocks (what run --survey-only leaves), with `state` over it."""
    j = Journal.open(out, fingerprint, restart=False)
    j.pin("micro_batch", 4)
    j.pin("grams", {"grams_on": "host", "gram_chunk_columns": 0})
    j.record_eval("before", EVAL)
    for layer in range(layers):
        j.finish_survey_block(layer, {"costs": [float(layer)], "anything": "the survey records"})
    j.state.update(state)
    j.save()
    return j


FREE = ("sparsity",)


def test_another_folders_survey_is_taken_whole(tmp_path):
    source = surveyed_run(tmp_path / "survey")
    carried = journal.survey_from(tmp_path / "survey", dict(FINGERPRINT, sparsity=0.5), FREE, layers=2)
    assert carried == {"survey": source.surveyed, "micro_batch": 4, "version": __version__, "eval": {"before": EVAL},
                       "grams": {"grams_on": "host", "gram_chunk_columns": 0}}
    j = Journal.open(tmp_path / "out", dict(FINGERPRINT, sparsity=0.5), restart=False, survey_free=FREE,
                     survey=lambda: carried)
    assert j.reused_survey == 2 and j.surveyed == source.surveyed and j.pin("micro_batch", 16) == 4
    assert j.eval_result("before") == EVAL and j.next_block == 0 and "run" not in j.state


def test_a_resumed_run_does_not_read_the_survey_again(tmp_path):
    Journal.open(tmp_path, FINGERPRINT, restart=False)
    again = Journal.open(tmp_path, FINGERPRINT, restart=False, survey=lambda: pytest.fail("read again"))
    assert again.reused_survey == 0


@pytest.mark.parametrize("change, pattern", [
    (dict(samples=8), r"differs from this run in the calibration \(--samples\);"),
    (dict(seed=1), r"differs from this run in the options \(--seed\);"),
    ({"input:config.json": "cc"}, r"differs from this run in the model \(config\.json\);"),
    (dict(shards="/models/b"), r"in the model \(it surveyed /models/a\);"),
])
def test_a_survey_of_another_model_calibration_or_options_is_refused(tmp_path, change, pattern):
    surveyed_run(tmp_path, dict(FINGERPRINT, shards="/models/a"))
    with pytest.raises(StreamPruneError, match=pattern):
        journal.survey_from(tmp_path, {**FINGERPRINT, "shards": "/models/a", "sparsity": 0.5, **change}, FREE, layers=2)


def test_a_survey_of_another_version_or_unfinished_is_refused(tmp_path):
    surveyed_run(tmp_path / "old", version="0.0.9")
    with pytest.raises(StreamPruneError, match=f"made by streamprune 0.0.9, this is {__version__}; survey again"):
        journal.survey_from(tmp_path / "old", FINGERPRINT, FREE, layers=2)
    older = surveyed_run(tmp_path / "older")
    del older.state["version"]
    older.save()
    with pytest.raises(StreamPruneError, match="made by an older streamprune"):
        journal.survey_from(tmp_path / "older", FINGERPRINT, FREE, layers=2)
    surveyed_run(tmp_path / "part", layers=1)
    with pytest.raises(StreamPruneError, match="its survey covers 1 of 2 blocks; finish it first"):
        journal.survey_from(tmp_path / "part", FINGERPRINT, FREE, layers=2)


def test_a_refused_resume_says_how_to_prune_again_from_the_survey(tmp_path):
    j = surveyed_run(tmp_path)
    j.finish_block(0, record(0))
    with pytest.raises(StreamPruneError, match=f"--survey-from {tmp_path} --out NEW$"):
        Journal.open(tmp_path, dict(FINGERPRINT, sparsity=0.5), restart=False, survey_free=FREE)
    with pytest.raises(StreamPruneError, match="--restart to start over$"):
        Journal.open(tmp_path, dict(FINGERPRINT, samples=8), restart=False, survey_free=FREE)


def test_the_running_packages_version_decides(tmp_path, monkeypatch):
    import streamprune
    surveyed_run(tmp_path)
    monkeypatch.setattr(streamprune, "__version__", "9.9.9")
    with pytest.raises(StreamPruneError, match=f"made by streamprune {__version__}, this is 9.9.9"):
        journal.survey_from(tmp_path, FINGERPRINT, FREE, layers=2)
