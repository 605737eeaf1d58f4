"""What a run tells as it goes: its log file, OUT/streamprune.log (one line per event: start or
resume, phases, warnings, each finished block, the end; UTC timestamps; appended session after
session), and its progress inside a block."""

from __future__ import annotations

import logging
import sys
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
        return logging.WARNING, "interrupted (SIGTERM); finished blocks are saved: re-run the same command to resume"
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


class PlainProgress:
    """A progress bar's place where stderr is not a terminal (a log file, a pipe, a notebook): a plain
    line when it starts and one per step (block), with the rate and the time left, and inside a long
    step (BlockProgress) a line at most every INTERVAL seconds; no carriage returns. What the stream
    uses of tqdm's bar: update, set_postfix_str, disable, a context manager."""

    INTERVAL = 60.0  # seconds between two lines inside one step
    disable = False

    def __init__(self, desc: str, total: int, initial: int = 0, unit: str = "block", file=None):
        self.desc, self.total, self.n, self.unit, self.file = desc, total, initial, unit, file
        self.started, self.first = time.time(), initial
        self.write(f"{desc}: {initial}/{total} {unit}s" + (" done" if initial else ""))

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def write(self, line: str) -> None:
        print(line, file=self.file or sys.stderr, flush=True)
        self.shown = time.time()

    def update(self, n: int = 1) -> None:
        self.n += n
        elapsed, done = time.time() - self.started, self.n - self.first
        rate = (f"{elapsed / done:.1f} s/{self.unit}" if elapsed >= done else f"{done / elapsed:.1f} {self.unit}s/s")
        left = elapsed / done * (self.total - self.n)
        self.write(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {clock(elapsed)} elapsed, {rate}, "
                   f"{clock(left)} left")

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        if time.time() - self.shown >= self.INTERVAL:
            self.write(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {text}")


def clock(seconds: float) -> str:
    """0:07, 12:30, 1:02:03, as tqdm shows times."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
