"""`python -m streamprune`, and the `streamprune` command (`run`, pyproject.toml). The signal
handlers come first (signals.py), so a Ctrl-C or SIGTERM while Python is still importing the
command ends like one during a run: the resume message, exit 130 (SIGTERM: 143), no traceback.
(Before this file runs, during Python's own start-up, a signal still has its default effect.)"""

import sys

from . import signals


def main() -> None:
    signals.handle_signals(arm=True)
    from .cli import entry_point
    if signals.received:  # an import swallowed the signal's exception
        sys.exit(signals.report_interrupt())
    entry_point()


def run() -> None:
    try:
        main()
    except KeyboardInterrupt as e:
        sys.exit(signals.report_interrupt(e))


if __name__ == "__main__":
    run()
