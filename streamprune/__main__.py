"""`python -m streamprune`, and the `streamprune` command (`run`, pyproject.toml). A Ctrl-C or
SIGTERM while Python is still importing the command ends like one during a run: the resume
message, exit 130 (SIGTERM: 143), no traceback. (Before this file runs, during Python's own
start-up, a signal still has its default effect.)"""

import sys

INTERRUPTED = "\ninterrupted; finished blocks are saved: re-run the same command to resume"  # cli.INTERRUPTED
early: list[int] = []  # signals received before cli.entry_point took over


def on_early_signal(signum, frame) -> None:
    early.append(signum)
    raise KeyboardInterrupt()


def on_unraisable(unraisable) -> None:
    """A signal's KeyboardInterrupt that an import could not propagate ("Exception ignored in
    ..."): recorded in `early` and handled below, not printed."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def interrupted() -> None:
    print(INTERRUPTED, file=sys.stderr)
    sys.exit(128 + (early[0] if early else 2))  # 2: SIGINT


def main() -> None:
    import signal
    sys.unraisablehook = on_unraisable
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored (nohup, a background job): stays ignored
            signal.signal(sig, on_early_signal)
    from .cli import entry_point
    if early:  # an import swallowed the signal's exception
        interrupted()
    entry_point()


def run() -> None:
    try:
        main()
    except KeyboardInterrupt:
        interrupted()


if __name__ == "__main__":
    run()
