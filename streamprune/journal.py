"""Resume state: which blocks are finished, with what result, for which arguments.
Every update is an atomic, fsynced rewrite of one small JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import StreamPruneError
from .fsutil import atomic_write_json

WORKDIR = ".streamprune"


def refuse_foreign_folder(out: Path) -> None:
    """Refuse a non-empty folder that holds no streamprune journal (someone else's files)."""
    out = Path(out)
    if (out / WORKDIR / "journal.json").is_file() or not out.is_dir():
        return
    if any(p.name != WORKDIR for p in out.iterdir()):
        raise StreamPruneError(f"{out} exists, is not empty and is not a streamprune output; choose an empty or new "
                               "folder (streamprune never deletes files it did not write)")


def mismatch(out: Path, before: dict, now: dict) -> StreamPruneError:
    """Why a run cannot resume: its input files (keys `input:NAME`) or its arguments changed."""
    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    changed = [k.removeprefix("input:") for k in diff if k.startswith("input:")]
    if changed:
        return StreamPruneError(
            f"the input model changed since the run in {out} began ({', '.join(changed)}); resuming would mix "
            "blocks pruned from different inputs: restore the input, or pass --restart to start over")
    return StreamPruneError(f"{out} holds a run with different arguments ({', '.join(diff)}); "
                            "use the same arguments to resume, or --restart to start over")


class Journal:
    def __init__(self, path: Path, state: dict):
        self.path = path
        self.state = state

    @classmethod
    def open(cls, out: Path, fingerprint: dict, restart: bool) -> "Journal":
        """Resume the journal in `out`, or start a new one. Refuses to mix arguments, and to
        write into a non-empty folder that streamprune did not create."""
        out = Path(out)
        path = out / WORKDIR / "journal.json"
        if path.is_file() and not restart:
            try:
                state = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise StreamPruneError(f"{path} is corrupt; re-run with --restart") from None
            if state.get("fingerprint") != fingerprint:
                raise mismatch(out, state.get("fingerprint", {}), fingerprint)
            return cls(path, state)
        if not restart:  # (a restarted run checked before it cleared the folder)
            refuse_foreign_folder(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = cls(path, {"fingerprint": fingerprint, "blocks": {}, "complete": False})
        journal.save()
        return journal

    def save(self) -> None:
        atomic_write_json(self.path, self.state)

    @property
    def next_block(self) -> int:
        done = self.state["blocks"]
        i = 0
        while str(i) in done:
            i += 1
        return i

    def record(self, block: int) -> dict | None:
        return self.state["blocks"].get(str(block))

    def finish_block(self, block: int, record: dict) -> None:
        self.state["blocks"][str(block)] = record
        self.save()

    @property
    def complete(self) -> bool:
        return bool(self.state.get("complete"))

    def finish(self) -> None:
        self.state["complete"] = True
        self.save()
