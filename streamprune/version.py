"""streamprune's version: the package's, and the one a journal records, so that a survey is reused
(run --survey-from) only by the version that made it. Raise it when what a run writes or records
changes. A leaf: no streamprune import."""

import sys

__version__ = "0.2.0"


def current_version() -> str:
    """The running package's version: `streamprune.__version__` (this module's unless something set
    another there), read when asked."""
    return getattr(sys.modules.get("streamprune"), "__version__", __version__)
