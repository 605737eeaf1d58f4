"""Sizes in bytes as people write them (--max-memory 24GiB) and read them (every message)."""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import StreamPruneError

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_bytes(text: str) -> int:
    """'24GiB', '512MB', '1.5g', '1000000' -> bytes (decimal arithmetic: no float overflow)."""
    m = SIZE.fullmatch(str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise StreamPruneError(f"cannot read {text!r} as a size (examples: 24GiB, 512MB)")
    return int(Decimal(m.group(1)) * UNITS[m.group(2).lower()])


def size_text(n: int) -> str:
    """A byte count as people read it: MiB under a GiB, GiB above (one format in every message)."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
