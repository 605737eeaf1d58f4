"""What a run tells as it goes: its log file, OUT/streamprune.log (one line per event: start or
resume, phases, warnings, each finished block, the end; UTC timestamps; appended session after
session), and its progress inside a block."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import error_message, one_line, user_facing
from ..signals import Terminated

log = logging.getLogger(__name__)

LOG_FILE = "streamprune.log"
FILE_ONLY = {"file_only": True}  # `extra=` of a record for the log file, not the terminal (one per block)
TERMINAL_ONLY = {"terminal_only": True}  # `extra=` of a record for the terminal only ("already complete")


class RunLogHandler(logging.FileHandler):
    """OUT/streamprune.log, opened only when a session has something to log: the `earlier` records
    (checks made before the folder was locked) are written before the first record of the session,
    and records meant for the terminal only are not written. So a re-run that finds the run
    complete leaves the file as it is."""

    def __init__(self, path: Path, earlier=()):
        super().__init__(path, encoding="utf-8", delay=True)
        self.pending = list(earlier)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "terminal_only", False):
            return
        pending, self.pending = self.pending, []
        for r in pending:
            super().emit(r)
        super().emit(record)


class FileOnly(logging.Filter):
    """Drops the records meant for the log file only (a terminal handler's filter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


@contextmanager
def recording(handler: logging.Handler):
    """`handler` gets the records of streamprune's loggers from INFO up while in the block."""
    logger = logging.getLogger("streamprune")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Held(logging.Handler):
    """Keeps records (the warnings of the checks made before the output folder is locked) for the log."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def held_records():
    """The records logged in the block, as a list (filled as they come)."""
    held = Held()
    with recording(held):
        yield held.records


@contextmanager
def run_log(out: Path, earlier: list[logging.LogRecord] = ()):
    """Append the records of streamprune's loggers (INFO and up) to OUT/streamprune.log while the
    run is in the block, after the `earlier` ones (with their own times); a run that ends by an
    interruption or an error says so in its last line (why_stopped)."""
    handler = RunLogHandler(Path(out) / LOG_FILE, earlier)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.setLevel(logging.INFO)
    try:
        with recording(handler):
            try:
                yield
            except BaseException as e:
                level, line = why_stopped(e)
                log.log(level, "%s", line, extra=FILE_ONLY)  # (the terminal says it its own way)
                raise
    finally:
        handler.close()


def why_stopped(e: BaseException) -> tuple[int, str]:
    """The log's last line of a run that `e` ended, and its level."""
    if isinstance(e, Terminated):
        return logging.WARNING, "terminated (SIGTERM); finished blocks are saved: re-run the same command to resume"
    if isinstance(e, KeyboardInterrupt):
        return logging.WARNING, "interrupted (Ctrl-C); finished blocks are saved: re-run the same command to resume"
    if isinstance(e, SystemExit):
        return logging.WARNING, f"stopped: exit {e.code}"
    what = error_message(e) if user_facing(e) else f"{type(e).__name__}: {e}"
    return logging.ERROR, f"stopped by an error: {one_line(what)}"


class BlockProgress:
    """Progress inside a block (a 70B block on a CPU takes minutes): the micro-batches read so far,
    as the bar's postfix, refreshed at most twice a second."""

    def __init__(self, bar):
        self.bar, self.layer, self.count, self.shown = bar, None, 0, 0.0

    def tick(self, layer: int) -> None:
        if self.bar is None:
            return
        if layer != self.layer:
            self.layer, self.count = layer, 0
        self.count += 1
        if time.time() - self.shown >= 0.5:
            plural = "es" if self.count > 1 else ""
            self.bar.set_postfix_str(f"block {layer}: {self.count} micro-batch{plural} read", refresh=True)
            self.shown = time.time()
