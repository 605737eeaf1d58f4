"""The per-block record, and the checks of what a run reads back as JSON (its journal, a report).
One pruned block's record goes from the pruning pass into the journal and from there into
report.json; both read it back through `check_block_record`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
              float: "a number", type(None): "null"}
MAX_UNITS = 2**53  # counts a float holds exactly
MAX_HEADS = 2**16  # the report's head map draws one cell per head and layer
PAIRS = ("heads", "kv_heads", "neurons", "params")  # [before, after]


@dataclass
class BlockRecord:
    """What pruning did to one block: [before, after] pairs of its query heads, KV heads, MLP
    neurons and parameters, the units kept, the relative error of its output (|pruned - dense|^2
    over |dense - input|^2 on the calibration inputs), how it was scored and how long it took."""

    layer: int
    heads: list[int]
    kv_heads: list[int]
    neurons: list[int]
    params: list[int]
    relative_error: float
    kept_heads: list[int] = field(default_factory=list)
    kept_kv_heads: list[int] = field(default_factory=list)
    scoring: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    dropped: bool = False  # the whole block removed: its shard holds no tensor

    def as_json(self) -> dict:
        d = {"layer": self.layer, "dropped": True} if self.dropped else {"layer": self.layer}
        return dict(d, heads=self.heads, kv_heads=self.kv_heads, neurons=self.neurons, params=self.params,
                    kept_heads=self.kept_heads, kept_kv_heads=self.kept_kv_heads, relative_error=self.relative_error,
                    scoring=self.scoring, timing=self.timing)


# the fields every reader needs (a journaled record also has its timing)
RECORD_FIELDS = {"layer": (int,), "heads": (list,), "kv_heads": (list,), "neurons": (list,), "params": (list,),
                 "relative_error": (int, float)}


class Damaged(ValueError):
    """What is wrong with a loaded journal or report (becomes part of the one-line error)."""


def read_checked_json(path: Path, check) -> tuple[object, str | None]:
    """Parse `path` as UTF-8 JSON and `check` its structure: (value, None), or (None, what is wrong)."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
        check(value)
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except Damaged as e:
        return None, str(e)
    except (ValueError, RecursionError) as e:  # bad syntax, a 5,000-digit number, [[[[...]]]] nested too deep
        return None, f"not valid JSON: {e}"
    return value, None


def expect(value, types: tuple, what: str) -> None:
    """Refuse `value` unless it is one of `types` (a boolean is not a number here)."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise Damaged(f"{what} is {JSON_NAMES.get(type(value), type(value).__name__)}, not {JSON_NAMES[types[-1]]}")


def expect_fields(obj: dict, fields: dict, what: str) -> None:
    for key, types in fields.items():
        if key not in obj:
            raise Damaged(f"{what} has no {key!r}")
        expect(obj[key], types, f"{what}[{key!r}]")


def check_block_record(record, what: str, journaled: bool = False) -> None:
    """A BlockRecord read back as JSON (`journaled`: from the journal, which also keeps its timing)."""
    expect(record, (dict,), what)
    expect_fields(record, dict(RECORD_FIELDS, timing=(dict,)) if journaled else RECORD_FIELDS, what)
    for name in PAIRS:
        pair = record[name]
        if len(pair) != 2:
            raise Damaged(f"{what}[{name!r}] has {len(pair)} entries, not 2 (before, after)")
        for n in pair:
            expect(n, (int,), f"{what}[{name!r}] entry")
            if not 0 <= n <= MAX_UNITS:
                raise Damaged(f"{what}[{name!r}] has {n}")
    if record["heads"][0] > MAX_HEADS:
        raise Damaged(f"{what} has {record['heads'][0]} heads")
    expect(record.get("kept_heads", []), (list,), f"{what}['kept_heads']")
    for h in record.get("kept_heads", []):
        expect(h, (int,), f"{what}['kept_heads'] entry")
