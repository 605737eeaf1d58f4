"""Ctrl-C and SIGTERM: either one, at any moment, ends in the resume message and exit 130 / 143,
no traceback; from the first line `python -m streamprune` runs (__main__.py arms the handlers
before the command is imported) to the process's exit. SIGTERM (timeout, Slurm, docker stop) is
handled like Ctrl-C, so every path that saves work on Ctrl-C runs. Light: no click, no torch."""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM
INTERRUPTED = "\ninterrupted; finished blocks are saved: re-run the same command to resume"


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM (timeout, Slurm, docker stop), so every path that saves work on Ctrl-C runs."""


received: list[int] = []  # signals this process got, in order
ignored_at_start = {s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is signal.SIG_IGN}
MAX_REDELIVERIES, REDELIVERY_DELAY = 4, 0.01  # seconds
armed = False  # raise on a signal (while a command may be running), or only record it


def on_signal(signum, frame) -> None:
    received.append(signum)
    if armed:
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def on_unraisable(unraisable) -> None:
    """A signal's KeyboardInterrupt raised where Python cannot propagate it (a weakref callback
    during an import, a __del__) would be printed as "Exception ignored in ..." and lost: send the
    signal again a moment later, from another thread, so that it raises in the main thread's
    ordinary code (a few times at most). Sending it from here would raise it in this hook."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)
    elif armed and received and len(received) <= MAX_REDELIVERIES:
        import threading
        threading.Timer(REDELIVERY_DELAY, os.kill, (os.getpid(), received[-1])).start()


def handle_signals(arm: bool, handler=on_signal) -> None:
    """Route SIGINT and SIGTERM to `handler`; one that was ignored when we started (nohup, a
    background job) stays ignored."""
    global armed
    armed = arm
    sys.unraisablehook = on_unraisable
    for sig in (signal.SIGINT, signal.SIGTERM):
        if sig not in ignored_at_start:
            signal.signal(sig, handler)


def interrupted_code(e: BaseException | None = None) -> int:
    """130 for Ctrl-C, 143 for SIGTERM (the first signal received decides)."""
    if received:
        return 128 + received[0]
    return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


def report_interrupt(e: BaseException | None = None, newline: bool = True) -> int:
    """Print the resume message (after a newline, so it does not follow a ^C); the exit code."""
    print(INTERRUPTED if newline else INTERRUPTED.lstrip("\n"), file=sys.stderr, flush=True)
    return interrupted_code(e)


def finish(code) -> None:
    """Exit with `code`, or as interrupted if a signal came that did not end the command yet."""
    handle_signals(arm=False, handler=signal.SIG_IGN)  # the work is done or saved; shut down quietly
    if received and code not in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        code = report_interrupt()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        # Everything is fsynced and the worker threads are joined; skip interpreter finalization,
        # which turns an exit into a death by signal when an interrupted library left a
        # KeyboardInterrupt flagged.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
