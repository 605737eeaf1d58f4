"""Resume state: which blocks are finished, with what result, for which arguments.
Every update is an atomic, fsynced rewrite of one small JSON file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import StreamPruneError
from ..version import current_version
from .fsutil import atomic_write_json
from .records import Damaged, check_block_record, expect, expect_fields, read_checked_json
from .runlog import LOG_FILE

WORKDIR = ".streamprune"



def refuse_foreign_folder(out: Path) -> None:
    """Refuse a non-empty folder that holds no streamprune journal (someone else's files)."""
    out = Path(out)
    if (out / WORKDIR / "journal.json").is_file() or not out.is_dir():
        return
    if any(p.name not in (WORKDIR, LOG_FILE) for p in out.iterdir()):
        raise StreamPruneError(f"{out} exists, is not empty and is not a streamprune output; choose an empty or new "
                               "folder (streamprune never deletes files it did not write)")


def mismatch(out: Path, before: dict, now: dict, survey_free: tuple[str, ...] = ()) -> StreamPruneError:
    """Why a run cannot resume: its input files (keys `input:NAME`) or its arguments changed (only
    `survey_free` ones: its survey can be pruned from again, into another folder)."""
    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    changed = [k.removeprefix("input:") for k in diff if k.startswith("input:")]
    if changed:
        return StreamPruneError(
            f"the input model changed since the run in {out} began ({', '.join(changed)}); resuming would mix "
            "blocks pruned from different inputs: restore the input, or pass --restart to start over")
    again = (f", or prune again from its survey into another folder: --survey-from {out} --out NEW"
             if survey_free and set(diff) <= set(survey_free) else "")
    return StreamPruneError(f"{out} holds a run with different arguments ({', '.join(diff)}); "
                            f"use the same arguments to resume, or --restart to start over{again}")


# What `save` writes, and what a resumed run reads: key -> (types, required).
FIELDS = {"fingerprint": ((dict,), True), "blocks": ((dict,), True), "complete": ((bool,), True),
          "micro_batch": ((int,), False), "blocks_seconds": ((int, float), False), "eval": ((dict,), False),
          "run": ((str,), False), "survey": ((dict,), False), "wall_seconds": ((int, float), False),
          "sessions": ((int,), False), "grams": ((dict,), False), "version": ((str,), False),
          "keep_mlp": ((bool,), False)}
GRAMS_FIELDS = {"grams_on": (str,), "gram_chunk_columns": (int,)}
EVAL_FIELDS = {"text_sha256": (str,), "seq_len": (int,), "windows": (int,), "tokens": (int,), "ppl": (int, float)}
def damaged(path: Path, problem: str) -> StreamPruneError:
    return StreamPruneError(f"the work folder {path.parent} is damaged ({path.name}: {problem}); "
                            "re-run with --restart to start over")


def load_state(path: Path) -> dict:
    """The journal's contents, refused as damaged unless they have the structure `save` writes."""
    if not path.is_file():
        raise damaged(path, "not a regular file")
    state, problem = read_checked_json(path, check_state)
    if problem:
        raise damaged(path, problem)
    return state


def check_state(state) -> None:
    expect(state, (dict,), "the journal")
    for key, (types, required) in FIELDS.items():
        if key in state:
            expect(state[key], types, repr(key))
        elif required:
            raise Damaged(f"no {key!r}")
    if state.get("micro_batch", 1) < 1:
        raise Damaged(f"'micro_batch' is {state['micro_batch']}")
    if "grams" in state:
        expect_fields(state["grams"], GRAMS_FIELDS, "'grams'")
        if state["grams"]["grams_on"] not in ("host", "device") or state["grams"]["gram_chunk_columns"] < 0:
            raise Damaged(f"'grams' is {state['grams']}")
    for key, record in state["blocks"].items():
        if not (key.isascii() and key.isdigit()) or (key != "0" and key.startswith("0")):
            raise Damaged(f"block key {key!r} is not a layer number")
        check_block_record(record, f"block {key}", journaled=True)
        if record["layer"] != int(key):
            raise Damaged(f"block {key} says it is layer {record['layer']}")
    for which, result in state.get("eval", {}).items():
        expect(result, (dict,), f"'eval'[{which!r}]")
        expect_fields(result, EVAL_FIELDS, f"'eval'[{which!r}]")


def has_work(state: dict) -> bool:
    """Whether a journal recorded anything a run did: a perplexity, a surveyed or a pruned block."""
    return bool(state.get("blocks") or state.get("survey") or state.get("eval") or state.get("complete"))


# what a reused survey brings along: its costs, the micro-batch and Gram placement its float sums
# depend on, its run id (whose activation cache it claimed), its time, the input's perplexity
CARRIED = ("survey", "micro_batch", "grams", "run", "wall_seconds", "sessions", "version")


def survey_carried(state: dict, fingerprint: dict, survey_free: tuple[str, ...]) -> dict | None:
    """What a run with `fingerprint` takes from the journal `state` of a survey-only (or stopped
    before pruning) run whose arguments differ only in `survey_free` ones; None when nothing."""
    if not survey_free or not state.get("survey") or state.get("blocks") or state.get("complete"):
        return None
    strip = lambda fp: {k: v for k, v in fp.items() if k not in survey_free}  # noqa: E731
    if strip(state.get("fingerprint", {})) != strip(fingerprint):
        return None
    carried = {k: state[k] for k in CARRIED if k in state}
    before = state.get("eval", {}).get("before")
    if before is not None:
        carried["eval"] = {"before": before}
    return carried


# what a survey brings to a run in another folder (--survey-from): its records, the micro-batch and
# Gram placement its float sums depend on, the version that made it
SURVEY_FROM = ("survey", "micro_batch", "grams", "version")
# what a survey depends on, as named when another folder's survey is refused: fingerprint keys by kind
MODEL_KEYS, CALIBRATION_KEYS = ("shards",), ("calib", "calib_sha256", "calib_dataset", "text_field", "samples",
                                             "seq_len")


def survey_from(folder: Path, fingerprint: dict, survey_free: tuple[str, ...], layers: int) -> dict:
    """What a run with `fingerprint` takes from the run in `folder` (--survey-from): its survey's
    journal records, whatever they hold, with SURVEY_FROM and the input's perplexity. Refused in one
    line unless that run surveyed all `layers` blocks with this version, of the same model, on the
    same calibration windows, with every option the survey depends on (all but `survey_free`) alike."""
    state = load_state(Path(folder) / WORKDIR / "journal.json")
    version = current_version()
    if state.get("version") != version:
        made_by = f"streamprune {state['version']}" if "version" in state else "an older streamprune"
        raise StreamPruneError(f"--survey-from {folder}: its survey was made by {made_by}, this is {version}; "
                               "survey again (leave out --survey-from)")
    strip = lambda fp: {k: v for k, v in fp.items() if k not in survey_free}  # noqa: E731
    before, now = strip(state["fingerprint"]), strip(fingerprint)
    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if diff:
        files = [k.removeprefix("input:") for k in diff if k.startswith("input:")]
        model = [f"it surveyed {before.get('shards')}"] if "shards" in diff else files[:3] + ["..."] * (len(files) > 3)
        calibration = ["the text" if k == "calib_sha256" else f"--{k.replace('_', '-')}" for k in diff
                       if k in CALIBRATION_KEYS]
        other = [f"--{k.replace('_', '-')}" for k in diff if k not in MODEL_KEYS + CALIBRATION_KEYS
                 and not k.startswith("input:")]
        how = "; ".join(f"{what} ({', '.join(map(str, keys))})" for what, keys in (
            ("the model", model), ("the calibration", calibration), ("the options", other)) if keys)
        raise StreamPruneError(f"--survey-from {folder}: its survey differs from this run in {how}; survey again "
                               "(leave out --survey-from), or give the survey's arguments")
    surveyed = len(state.get("survey", {}))
    if surveyed < layers:
        raise StreamPruneError(f"--survey-from {folder}: its survey covers {surveyed} of {layers} blocks; finish it "
                               "first (re-run its command)")
    carried = {k: state[k] for k in SURVEY_FROM if k in state}
    before_eval = state.get("eval", {}).get("before")
    return dict(carried, eval={"before": before_eval}) if before_eval else carried


class Journal:
    """Also keeps the run's time over all its sessions: every save adds the time since the last one
    (or since this session began) to "wall_seconds", so a killed session loses only what it did
    since its last finished step."""

    def __init__(self, path: Path, state: dict, started: float | None = None):
        self.path = path
        self.state = state
        self.mark = time.time() if started is None else started
        self.replaced = False  # whether it replaced the journal of a run with other arguments that did no work
        self.reused_survey = 0  # blocks surveyed by an earlier run with other survey-free arguments

    @classmethod
    def open(cls, out: Path, fingerprint: dict, restart: bool, started: float | None = None,
             survey_free: tuple[str, ...] = (), survey: Callable[[], dict] | None = None) -> "Journal":
        """Resume the journal in `out`, or start a new one (this session began at `started`).
        Refuses to mix arguments, and to write into a non-empty folder that streamprune did not
        create. A journal that holds a survey and no pruned block, of a run whose arguments differ
        from these only in `survey_free` ones (what the survey does not depend on: the sparsity,
        the allocation, the method), gives this run its survey (`reused_survey` blocks). A new journal
        starts with what `survey()` gives, if given (another folder's survey: survey_from)."""
        out = Path(out)
        path = out / WORKDIR / "journal.json"
        replaced = False
        if (path.exists() or path.is_symlink()) and not restart:
            state = load_state(path)
            if state.get("fingerprint") == fingerprint:
                return cls(path, state, started)
            carried = survey_carried(state, fingerprint, survey_free)
            if carried is not None:
                journal = cls(path, {"fingerprint": fingerprint, "blocks": {}, "complete": False, **carried}, started)
                journal.reused_survey = len(carried["survey"])
                journal.save()
                return journal
            if has_work(state):
                raise mismatch(out, state.get("fingerprint", {}), fingerprint,
                               survey_free if state.get("survey") else ())
            # a run refused or stopped before it did any work (not enough disk) pins nothing: the
            # corrected command starts afresh (and says so: `replaced`)
            replaced = True
        if not restart:  # (a restarted run checked before it cleared the folder)
            refuse_foreign_folder(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        carried = survey() if survey is not None else {}
        journal = cls(path, {"fingerprint": fingerprint, "blocks": {}, "complete": False, "version": current_version(),
                             **carried}, started)
        journal.replaced = replaced
        journal.reused_survey = len(carried.get("survey", {}))
        journal.save()
        return journal

    @classmethod
    def copy(cls, state: dict) -> "Journal":
        """An in-memory journal holding `state` (rank 0's), for the other ranks of a job: saves nothing."""
        journal = cls(None, state)
        journal.save = lambda: None
        return journal

    def save(self) -> None:
        self.state["wall_seconds"] = self.wall_seconds
        self.mark = time.time()
        atomic_write_json(self.path, self.state)

    @property
    def wall_seconds(self) -> float:
        """Time the run has taken so far, all sessions together."""
        return round(self.state.get("wall_seconds", 0) + time.time() - self.mark, 3)

    @property
    def sessions(self) -> int:
        return self.state.get("sessions", 0)

    def start_session(self) -> int:
        """Count this session (when it does work); returns how many there have been."""
        self.state["sessions"] = self.sessions + 1
        self.save()
        return self.sessions

    @property
    def next_block(self) -> int:
        done = self.state["blocks"]
        i = 0
        while str(i) in done:
            i += 1
        return i

    def pin(self, key: str, value):
        """A value fixed when the run began (micro-batch, run id): a resumed run gets the first run's."""
        if key not in self.state:
            self.state[key] = value
            self.save()
        return self.state[key]

    @property
    def surveyed(self) -> dict[str, dict]:
        """The survey's record of each block surveyed so far (by str(layer))."""
        return self.state.get("survey", {})

    def finish_survey_block(self, block: int, record: dict) -> None:
        self.state.setdefault("survey", {})[str(block)] = record
        self.save()

    def eval_result(self, which: str) -> dict | None:
        """The perplexity measured "before" or "after" pruning, if it was."""
        return self.state.get("eval", {}).get(which)

    def record_eval(self, which: str, result: dict) -> None:
        self.state.setdefault("eval", {})[which] = result
        self.save()

    @property
    def blocks_seconds(self) -> float | None:
        return self.state.get("blocks_seconds")

    def add_blocks_seconds(self, seconds: float) -> None:
        """Time this session spent in the pruning pass, added to earlier sessions' (saved with the
        next journal write)."""
        self.state["blocks_seconds"] = round(self.state.get("blocks_seconds", 0) + seconds, 3)

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
