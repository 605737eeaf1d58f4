"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class StreamPruneError(Exception):
    """A problem the user can fix (bad input, bad arguments, no space...). Message is one line."""
