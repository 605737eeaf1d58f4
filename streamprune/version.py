"""streamprune's version: the package's, and the one a journal records, so that a survey is reused
(run --survey-from) only by the version that made it. Raise it when what a run writes or records
changes. A leaf: no streamprune import."""

__version__ = "0.1.0"
