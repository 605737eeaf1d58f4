"""A run as a user meets it: defaults fitted to the text and the model, refusals that pin nothing,
one evaluation window for `run --eval` and `eval`, a re-run of a finished output that changes
nothing, time kept over sessions, and the log file."""

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamprune.checks import validate
from streamprune.cli import main
from streamprune.config import RunConfig
from streamprune.engine import pipeline
from streamprune.errors import StreamPruneError
from tests.harness import interrupt_pruning_at
from tests.models import save_tiny_model

DEMO = Path(__file__).resolve().parents[2] / "demo"
FAST = ["--method", "magnitude", "--allocation", "rule"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 3-layer Llama with max_position_embeddings 512 and the demo's tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("m") / "in", "llama", layers=3, vocab=512,
                           tokenizer_from=DEMO / "stories260K")


def text(tmp_path, chars: int, name="calib.txt", source="calib.txt") -> Path:
    path = tmp_path / name
    path.write_text((DEMO / source).read_text()[:chars])
    return path


def run(*args):
    r = CliRunner().invoke(main, ["run", *[str(a) for a in args]])
    return r


def journal(out: Path) -> dict:
    return json.loads((out / ".streamprune" / "journal.json").read_text())


@pytest.mark.slow
def test_defaults_fit_a_short_text_and_the_model_with_a_warning(tmp_path, model):
    out, calib = tmp_path / "out", text(tmp_path, 4000)
    args = ["--shards", model, "--out", out, "--calib", calib, "--quiet", *FAST]
    r = run(*args)
    assert r.exit_code == 0, r.output
    fp = journal(out)["fingerprint"]
    samples, seq_len = fp["samples"], fp["seq_len"]
    assert samples == 8 and 32 <= seq_len < 512  # too short for 8 windows of 512 (max positions): 8 shorter
    assert (f"warning: using --samples 8 (not 128) and --seq-len {seq_len} (not 2,048): max_position_embeddings is "
            "512 and the calibration text has ") in r.stderr
    assert json.loads((out / "report.json").read_text())["arguments"]["seq_len"] == seq_len
    again = run(*args[:-5], *FAST)  # the same command fits the same way: it resumes (here: nothing to do)
    assert again.exit_code == 0 and "already complete" in again.stderr


@pytest.mark.slow
def test_the_warning_names_only_the_options_it_changed(tmp_path, model):
    r = run("--shards", model, "--out", tmp_path / "out", "--calib", text(tmp_path, 4000), "--seq-len", 64, "--quiet",
            *FAST)  # --seq-len set: only the window count adapts
    assert r.exit_code == 0, r.output
    assert re.search(r"warning: using --samples \d+ \(not 128\): the calibration text has [\d,]+ tokens", r.stderr), \
        r.stderr


def test_values_the_user_set_are_kept_or_refused_with_what_the_text_holds(tmp_path, model):
    calib = text(tmp_path, 4000)
    r = run("--shards", model, "--out", tmp_path / "a", "--calib", calib, "--samples", 128, "--seq-len", 512, *FAST)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert ("1,875 tokens; --samples 128 x --seq-len 512 needs 65,408: it holds --samples 3 at --seq-len 512, or "
            "--samples 7 at --seq-len 256; or use a longer text") in r.stderr
    r = run("--shards", model, "--out", tmp_path / "b", "--calib", calib, "--seq-len", 1024, *FAST)
    assert r.exit_code == 2
    assert r.stderr == "error: --seq-len 1024 exceeds max_position_embeddings 512; use at most 512\n"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


@pytest.mark.slow
def test_a_refused_run_pins_nothing(tmp_path, model, monkeypatch):
    """Refused for disk after its journal was written, then run with other arguments: it starts afresh."""
    out, calib = tmp_path / "out", DEMO / "calib.txt"
    real = shutil.disk_usage
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    r = run("--shards", model, "--out", out, "--calib", calib, "--samples", 4, "--seq-len", 64, "--quiet", *FAST)
    assert r.exit_code == 2 and "not enough free disk" in r.stderr
    monkeypatch.setattr(validate.shutil, "disk_usage", real)
    r = run("--shards", model, "--out", out, "--calib", calib, "--samples", 3, "--seq-len", 64, "--quiet", *FAST)
    assert r.exit_code == 0, r.output
    assert "held a run with other arguments that had not started" in r.stderr
    assert journal(out)["fingerprint"]["samples"] == 3 and journal(out)["complete"]


@pytest.mark.slow
def test_run_eval_and_eval_use_one_window_and_say_it(tmp_path, model):
    out, ev = tmp_path / "out", text(tmp_path, 6000, "eval.txt", "eval.txt")
    r = run("--shards", model, "--out", out, "--calib", DEMO / "calib.txt", "--samples", 2, "--seq-len", 32,
            "--eval", ev, "--quiet", *FAST)
    assert r.exit_code == 0, r.output
    e = json.loads((out / "report.json").read_text())["eval"]
    assert e["seq_len"] == 512  # not --seq-len: the default window, 2048 capped at max positions
    assert f"over {e['windows']} windows of 512 tokens: {e['ppl_before']:.3f} -> " in r.stdout
    log = (out / "streamprune.log").read_text()
    for phase in ("evaluating input (before)", "pruning", "evaluating output (after)"):
        assert f"INFO {phase}: " in log
    assert log.index("evaluating input (before)") < log.index("pruning") < log.index("evaluating output (after)")
    alone = CliRunner().invoke(main, ["eval", "--model", str(model), "--text", str(ev), "--quiet"])
    assert f"perplexity {e['ppl_before']:.4f} on {ev} over {e['windows']} windows of 512 tokens" in alone.stdout


@pytest.mark.slow
def test_rerun_of_a_finished_output_leaves_it_alone(tmp_path, model):
    out = tmp_path / "out"
    args = ["--shards", model, "--out", out, "--calib", DEMO / "calib.txt", "--samples", 2, "--seq-len", 32, *FAST]
    assert run(*args, "--quiet").exit_code == 0
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = run(*args)
    assert r.exit_code == 0 and f"already complete: {out} (nothing to do)" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files  # the log and the card too


@pytest.mark.slow
def test_resumed_run_reports_the_time_of_all_sessions_and_logs_them(tmp_path, model, monkeypatch):
    out = tmp_path / "out"
    cfg = RunConfig(shards=model, out=out, calib=DEMO / "calib.txt", samples=4, seq_len=32, progress=False,
                    method="magnitude")
    resume = interrupt_pruning_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    first = journal(out)["wall_seconds"]
    resume()
    r = run("--shards", model, "--out", out, "--calib", DEMO / "calib.txt", "--samples", 4, "--seq-len", 32,
            "--method", "magnitude")  # the same run, from the command line
    assert r.exit_code == 0, r.output
    assert "pruning: 3 blocks (resuming: 1 of 3 blocks done)\n" in r.stderr and "over 2 sessions" in r.stdout
    timing = json.loads((out / "report.json").read_text())["timing"]
    assert timing["sessions"] == 2 and timing["seconds"] > first
    assert timing["wall_seconds_total"] >= timing["seconds"] and timing["blocks_seconds"] > 0
    log = (out / "streamprune.log").read_text()
    assert log.count("INFO starting a run: ") == 1 and log.count("INFO resuming the run: ") == 1
    assert "INFO pruning: 3 blocks (resuming: 1 of 3 blocks done)" in log  # block 1 waited for block 2's start
    assert "INFO survey: 3 blocks\n" in log and "INFO pruned block 2: heads" in log
    assert "finished: block params" in log.splitlines()[-1] and "2 sessions" in log.splitlines()[-1]


@pytest.mark.slow
def test_the_log_is_streamprunes_own_file(tmp_path, model):
    """It is never copied from an input (a pruned model pruned again), and --restart starts it anew."""
    out = tmp_path / "out"
    base = dict(calib=DEMO / "calib.txt", samples=2, seq_len=32, progress=False, method="magnitude", allocation="rule")
    pipeline.run(RunConfig(shards=model, out=out, **base))
    again = tmp_path / "again"
    pipeline.run(RunConfig(shards=out, out=again, sparsity=0.1, **base))
    assert (again / "streamprune.log").read_text().count("starting a run") == 1
    pipeline.run(RunConfig(shards=out, out=again, sparsity=0.2, restart=True, **base))
    assert str(out) in (again / "streamprune.log").read_text().splitlines()[0]
    with pytest.raises(StreamPruneError, match="different arguments"):
        pipeline.run(RunConfig(shards=out, out=again, sparsity=0.3, **base))
