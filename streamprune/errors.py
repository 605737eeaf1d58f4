"""The one exception type a run raises for what the user can fix, and the one line it is shown as:
the CLI prints `error: <line>` and exits 2; the Python API (api.py) raises it with that line."""

from __future__ import annotations

import errno


class StreamPruneError(Exception):
    """A problem the user can fix (bad input, bad arguments, no space...). Message is one line."""


def one_line(text: str) -> str:
    """`text` as one printable line: newlines and other control characters escaped, the bytes of
    a non-UTF-8 path (surrogate escapes) shown as \\xNN."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def gpu_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA out of memory (torch.OutOfMemoryError, a RuntimeError; or a RuntimeError that
    says so, from an older torch or a CUDA library), told apart without importing torch."""
    if any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower() and "cuda" in str(e).lower()


def user_facing(e: BaseException) -> bool:
    """What is shown as one line (error_message) rather than a traceback: a refusal, running out of
    host or GPU memory, an OS error."""
    return isinstance(e, (StreamPruneError, MemoryError, OSError)) or gpu_out_of_memory(e)


def error_message(e: BaseException) -> str:
    """What the user is told of a refusal, out of memory or an OS error (before one_line)."""
    if isinstance(e, MemoryError):
        return "out of memory; lower --batch-size or --samples"
    if gpu_out_of_memory(e):
        return "out of GPU memory; lower --batch-size or --samples, or give --max-memory below the GPU's free memory"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on device{' writing ' + str(e.filename) if e.filename else ''}; "
                "free some space and re-run the same command to resume")
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
    return str(e)
