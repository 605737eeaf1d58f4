import sys

try:
    from .cli import entry_point
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: nothing was started
    print("\ninterrupted before the run started; re-run the same command", file=sys.stderr)
    sys.exit(130)

entry_point()
