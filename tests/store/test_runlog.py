"""runlog: OUT/streamprune.log gets streamprune's INFO records with UTC times, the held early records
first, not the terminal-only ones; no file at all when nothing was logged; progress in a block."""

import logging
import re

import pytest

from streamprune.errors import StreamPruneError
from streamprune.signals import Terminated
from streamprune.store.runlog import (
    FILE_ONLY,
    LOG_FILE,
    TERMINAL_ONLY,
    BlockProgress,
    FileOnly,
    PlainProgress,
    clock,
    held_records,
    run_log,
)

log = logging.getLogger("streamprune.test_runlog")
LINE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (INFO|WARNING|ERROR) "


def test_the_log_holds_earlier_records_first_then_the_run(tmp_path):
    with held_records() as early:
        log.warning("checked before the lock")
        log.debug("too detailed")
    assert [r.getMessage() for r in early] == ["checked before the lock"]
    with run_log(tmp_path, early):
        log.info("block %d pruned", 0, extra=FILE_ONLY)
        log.info("already complete", extra=TERMINAL_ONLY)
        log.debug("not in the log")
    log.info("after the run")
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert [re.sub(LINE, "", x) for x in lines] == ["checked before the lock", "block 0 pruned"]
    assert all(re.match(LINE, x) for x in lines)


def test_a_session_that_logs_nothing_leaves_no_file_and_sessions_append(tmp_path):
    with run_log(tmp_path):
        log.info("already complete", extra=TERMINAL_ONLY)
    assert not (tmp_path / LOG_FILE).exists()
    for session in ("one", "two"):
        with run_log(tmp_path):
            log.info(session)
    assert [x.split(" ", 2)[2] for x in (tmp_path / LOG_FILE).read_text().splitlines()] == ["one", "two"]


def test_file_only_records_are_not_for_the_terminal():
    keep = logging.LogRecord("streamprune", logging.INFO, __file__, 1, "shown", None, None)
    drop = logging.makeLogRecord(dict(keep.__dict__, **FILE_ONLY))
    assert FileOnly().filter(keep) and not FileOnly().filter(drop)


def test_the_logger_level_is_restored():
    logger = logging.getLogger("streamprune")
    level = logger.level
    with held_records():
        assert logger.getEffectiveLevel() <= logging.INFO
    assert logger.level == level and not any(type(h).__name__ == "Held" for h in logger.handlers)


class Bar:
    def __init__(self):
        self.shown = []

    def set_postfix_str(self, text, refresh):
        self.shown.append(text)


def test_block_progress_counts_micro_batches_per_block():
    bar, none = Bar(), BlockProgress(None)
    none.tick(0)  # no bar: nothing to show
    p = BlockProgress(bar)
    p.tick(3)
    p.shown = 0.0  # (shown at most twice a second: pretend half a second passed)
    p.tick(3)
    p.tick(4)  # a new block starts counting again, but within the half second nothing is shown
    assert bar.shown == ["block 3: 1 micro-batch read", "block 3: 2 micro-batches read"] and p.count == 1


@pytest.mark.parametrize("error, last", [
    (KeyboardInterrupt(), "WARNING interrupted (Ctrl-C); finished blocks are saved: re-run the same command to resume"),
    (Terminated(), "WARNING interrupted (SIGTERM); finished blocks are saved: re-run the same command to resume"),
    (StreamPruneError("no space left\non device"), "ERROR stopped by an error: no space left\\non device"),
    (MemoryError(), "ERROR stopped by an error: out of memory; lower --batch-size or --samples"),
    (ValueError("a bug"), "ERROR stopped by an error: ValueError: a bug"),
])
def test_a_run_that_an_interruption_or_an_error_ends_says_so_last(tmp_path, error, last):
    with pytest.raises(type(error)):
        with run_log(tmp_path):
            log.info("pruned block 0")
            raise error
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert [x.split(" ", 1)[1] for x in lines] == ["INFO pruned block 0", last]


def test_plain_progress_prints_a_line_per_step_with_the_rate_and_the_time_left(monkeypatch):
    import io
    now = [100.0]
    monkeypatch.setattr("streamprune.store.runlog.time.time", lambda: now[0])
    out = io.StringIO()
    with PlainProgress("survey", 4, 1, file=out) as bar:
        now[0] += 30
        bar.set_postfix_str("block 1: 2 micro-batches read")  # within INTERVAL of the last line: not shown
        now[0] += 31
        bar.set_postfix_str("block 1: 3 micro-batches read")
        bar.update(1)
        now[0] += 20
        bar.update(1)
    assert out.getvalue().splitlines() == [
        "survey: 1/4 blocks done",
        "survey: 1/4 blocks, block 1: 3 micro-batches read",
        "survey: 2/4 blocks, 1:01 elapsed, 61.0 s/block, 2:02 left",
        "survey: 3/4 blocks, 1:21 elapsed, 40.5 s/block, 0:40 left"]
    assert "\r" not in out.getvalue()


def test_clock_reads_as_tqdm_shows_times():
    assert [clock(s) for s in (7, 750, 3723)] == ["0:07", "12:30", "1:02:03"]
