"""run_report.py: the report's time in dense passes comes from the survey's recorded phases, and its
keys do not depend on how a tiny run's times round."""

import pytest

from streamprune.engine.run_report import dense_pass_seconds, dense_passes
from streamprune.store.journal import Journal


def journal_with(survey: dict, wall_seconds: float = 2.0) -> Journal:
    return Journal.copy({"fingerprint": {}, "blocks": {}, "complete": False, "survey": survey,
                         "wall_seconds": wall_seconds})


def test_the_yardstick_is_the_surveys_reads_forwards_and_cache_writes():
    phases = {"shard_read": 0.1, "to_device": 0.05, "cache_read": 0.05, "dense_forward": 0.25, "cache_write": 0.05,
              "survey_gram": 3.0}
    journal = journal_with({"0": {"phases": phases}, "1": {"phases": phases}})
    assert dense_pass_seconds(journal) == 1.0
    assert dense_passes(journal)["dense_passes"] == pytest.approx(2.0, abs=0.05)


def test_a_tiny_runs_report_keeps_its_dense_passes_when_the_forward_rounds_to_zero():
    journal = journal_with({"0": {"phases": {"dense_forward": 0.0, "cache_write": 0.002, "shard_read": 0.001}}})
    assert dense_passes(journal) == {"dense_pass_seconds": 0.003, "dense_passes": pytest.approx(2.0 / 0.003, rel=0.01)}
    zero = journal_with({"0": {"phases": {"dense_forward": 0.0}}})
    assert dense_passes(zero) == {"dense_pass_seconds": 0.0, "dense_passes": None}


def test_no_survey_or_one_recorded_before_phases_has_no_yardstick():
    assert dense_passes(journal_with({})) == {}
    assert dense_passes(journal_with({"0": {"seconds": 1.0}})) == {}
