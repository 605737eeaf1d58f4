"""Hostile and careless command lines, damaged work folders and reports, and signals: every
failure is one `error: ...` line on stderr with exit code 2 (no traceback, no usage block) and
nothing half-written; SIGINT and SIGTERM at any moment end in the resume message and 130 / 143."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamprune.errors import one_line
from streamprune.signals import INTERRUPTED
from tests.harness import default_sigint, invoke, refused

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
MODEL = DEMO / "stories260K"
CALIB = DEMO / "calib.txt"
DAMAGED = r"the work folder .*\.streamprune is damaged \(journal\.json: .*{}.*\); re-run with --restart to start over$"


def run_args(out: Path, *extra):
    return ("run", "--shards", MODEL, "--out", out, "--calib", CALIB, "--samples", 2, "--seq-len", 16, "--quiet",
            *extra)


def plan_args(*extra):
    return ("plan", "--shards", MODEL, "--no-timing", *extra)


# ---- option values and paths ----------------------------------------------------------

NO_GPU = r"no CUDA GPU is available" if not torch.cuda.is_available() else r"this machine has \d+ CUDA GPU"
VALUES = {  # id -> (arguments after `run ... --out OUT` or a whole command line, stderr pattern)
    "size-two-dots": (("--max-memory", "1.2.3GiB"),
                      r"invalid value for '--max-memory': cannot read '1\.2\.3GiB' as a size"),
    "size-two-dots-plan": (plan_args("--max-memory", "1.2.3GiB"),
                           r"cannot read '1\.2\.3GiB' as a size .*see streamprune plan --help"),
    "size-nan": (("--max-memory", "nan"), "cannot read 'nan' as a size"),
    "size-negative": (("--max-memory", "-1GiB"), "cannot read '-1GiB' as a size"),
    "size-zero": (("--max-memory", "0"), "--max-memory must be between 1 byte and 16 EiB"),
    "size-overflow": (plan_args("--max-memory", "9" * 400), "--max-memory must be between 1 byte and 16 EiB"),
    "seed-float": (("--seed", "1e20"),
                   r"invalid value for '--seed': '1e20' is not a valid integer \(see streamprune run --help\)$"),
    "seed-overflow": (("--seed", str(2**70)), r"--seed must be in \[0, 4294967295\], got 1180591620717411303424"),
    "seed-negative": (("--seed", "-1"), r"--seed must be in \[0, 4294967295\], got -1"),
    "budget-nan": (("--budget", "nan"), r"--budget must be in \(0, 1000.0\], got nan"),
    "budget-inf": (("--budget", "inf"), r"--budget must be in \(0, 1000.0\], got inf"),
    "budget-negative": (("--budget", "-1"), r"--budget must be in \(0, 1000.0\], got -1.0"),
    "budget-huge-plan": (plan_args("--budget", "1e300"), r"--budget must be in \(0, 1000.0\]"),
    "sparsity-nan": (("--sparsity", "nan"), r"--sparsity must be in \[0, 1\), got nan"),
    "sparsity-inf": (("--sparsity", "inf"), r"--sparsity must be in \[0, 1\), got inf"),
    "sparsity-abc": (("--sparsity", "abc"), r"invalid value for '--sparsity': 'abc' is not a valid float"),
    "sparsity-newline": (("--sparsity", "0.3\nerror: fake"), r"'0\.3\\nerror: fake' is not a valid float"),
    "sparsity-above-model-max": (("--sparsity", "0.99"), r"--sparsity 0\.99 would remove every attention head"),
    "samples-zero": (("--samples", "0"), "--samples must be >= 1"),
    "samples-zero-plan": (plan_args("--samples", "0"), "--samples must be >= 1"),
    "seq-len-huge": (("--seq-len", str(10**12)), "--samples and --seq-len must be at most 2147483647"),
    "eval-seq-len-negative": (("--eval-seq-len", "-1"), r"--eval-seq-len must be 0 \(same as --seq-len\) or in \[2, "),
    "multiple-of-zero": (("--multiple-of", "0"), r"--multiple-of must be in \[1, 65536\], got 0"),
    "multiple-of-huge-plan": (plan_args("--multiple-of", str(10**30)), r"--multiple-of must be in \[1, 65536\]"),
    "multiple-of-more-than-heads": (("--multiple-of", "16"), "--multiple-of 16: block 0 has 8 query heads in 4 KV"),
    "inspect-multiple-of-zero": (("inspect", "--shards", MODEL, "--multiple-of", "0"), r"--multiple-of must be in \["),
    "batch-size-huge": (("--batch-size", str(10**30)), r"--batch-size must be in \[0, 2147483647\]"),
    "batch-size-negative": (("--batch-size", "-3"), r"--batch-size must be in \[0, "),
    "device-meta": (("--device", "meta"), "unsupported device 'meta' \\(cpu or cuda\\)"),
    "device-empty": (("--device", ""), "unsupported device '' \\(cpu or cuda\\)"),
    "device-gpu-99": (("--device", "cuda:99"), NO_GPU),
    "device-junk": (("--device", "cuda:x"), "unsupported device 'cuda:x'"),
    "method-unknown": (("--method", "oracle"), "unknown --method 'oracle'"),
    "compensate-unknown": (("--compensate", "magic"), "invalid value for '--compensate'"),
    "missing-option": (("run", "--out", "o"), r"^error: missing option '--shards' \(see streamprune run --help\)$"),
    "missing-value": (("--seed",), "option '--seed' requires an argument"),
    "unknown-option": (("--frobnicate",), r"no such option '--frobnicate'"),
    "unknown-command": (("frobnicate",), r"^error: no such command 'frobnicate' \(see streamprune --help\)$"),
    "extra-argument": (("inspect", "--shards", MODEL, "extra"), "got unexpected extra argument \\(extra\\)"),
    "out-empty": (("run", "--shards", MODEL, "--out", "", "--calib", CALIB),
                  "invalid value for '--out': '' is not a usable path"),
    "out-blank": (("run", "--shards", MODEL, "--out", "  ", "--calib", CALIB), "'  ' is not a usable path"),
    "shards-empty": (("inspect", "--shards", ""), "invalid value for '--shards'"),
    "calib-is-a-folder": (("--calib", DEMO), "invalid value for '--calib': File '.*demo' is a directory"),
    "eval-is-a-folder": (("--eval", DEMO), "invalid value for '--eval': File '.*demo' is a directory"),
    "shards-newline": (("inspect", "--shards", "/nonexistent\nerror: fake"),
                       r"model folder not found: /nonexistent\\nerror: fake$"),
    "inspect-above-model-max": (("inspect", "--shards", MODEL, "--sparsity", "0.99"),
                                "this model allows at most 0.951"),
    "inspect-nan": (("inspect", "--shards", MODEL, "--sparsity", "nan"), r"--sparsity must be in \[0, 1\), got nan"),
    "plan-above-model-max": (plan_args("--sparsity", "0.99"), "this model allows at most 0.951"),
    "plan-device-meta": (plan_args("--device", "meta"), "unsupported device 'meta'"),
    "eval-negative": (("eval", "--model", MODEL, "--text", CALIB, "--seq-len", "-1"),
                      "--seq-len, --batch-size and --max-windows must be >= 0"),
    "eval-text-folder": (("eval", "--model", MODEL, "--text", DEMO), "invalid value for '--text'"),
    "eval-device": (("eval", "--model", MODEL, "--text", CALIB, "--device", "tpu"), "unsupported device 'tpu'"),
    "report-png-folder": (("report", MODEL, "--png", DEMO), "invalid value for '--png'"),
}


@pytest.mark.parametrize("case", VALUES)
def test_bad_values_are_one_line(tmp_path, case):
    args, pattern = VALUES[case]
    out = tmp_path / "out"
    if args[0] not in ("run", "plan", "inspect", "eval", "report", "frobnicate"):
        args = run_args(out, *args)
    refused(invoke(*args), pattern)
    assert not (out / ".streamprune" / "journal.json").exists() and not (out / "config.json").exists()


def test_help_and_version_still_work():
    for args in (["--help"], ["run", "--help"], ["plan", "--help"]):
        r = invoke(*args)
        assert r.exit_code == 0 and r.output.startswith("Usage: streamprune"), r.output
    r = invoke("--version")
    assert r.exit_code == 0 and "version" in r.output


def test_max_memory_beyond_the_machine_is_a_warning(tmp_path):
    r = invoke(*plan_args("--seq-len", "256", "--max-memory", "17179869184GiB", "--json"))  # 16 EiB
    assert r.exit_code == 0, r.output
    assert re.fullmatch(r"warning: --max-memory [\d.]+ GiB is more than the [\d.]+ GiB of memory on this machine; "
                        r"the run may swap or be killed\n", r.stderr), r.stderr
    assert json.loads(r.stdout)["max_memory_bytes"] == 2**64


def test_messages_become_one_printable_line():
    assert one_line("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert one_line("path/\udcff\udcfe/é") == "path/\\xff\\xfe/é"  # a non-UTF-8 path from argv
    assert one_line("\x1b[31mred") == "\\x1b[31mred"
    assert one_line("lone \ud800") == "lone \\ud800"


@pytest.mark.slow
def test_non_utf8_path_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = os.fsencode(str(tmp_path)) + b"/\xff\xfe-model"
    p = subprocess.run([sys.executable, "-m", "streamprune", "inspect", "--shards", bad], env=env,
                       capture_output=True)
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr == b"error: model folder not found: " + os.fsencode(str(tmp_path)) + b"/\\xff\\xfe-model\n"


# ---- a damaged journal ------------------------------------------------------------------

def record(layer: int, **changes) -> dict:
    r = {"layer": layer, "heads": [8, 6], "kv_heads": [4, 3], "neurons": [172, 120], "params": [10, 7],
         "kept_heads": [0, 1], "relative_error": 0.1, "timing": {}}
    return {k: v for k, v in dict(r, **changes).items() if v is not None}


def journal(**changes) -> dict:
    return {k: v for k, v in dict({"fingerprint": {}, "blocks": {}, "complete": False}, **changes).items()
            if v is not None}


JOURNALS = {  # id -> (journal.json bytes, what the error says about it)
    "array": (b"[1, 2]", "the journal is an array, not an object"),
    "number": (b"42", "the journal is an integer, not an object"),
    "not-utf8": (b'{"blocks": "\xff\xfe"}', "not UTF-8 text"),
    "not-json": (b'{"blocks": {', "not valid JSON: "),
    "empty": (b"", "not valid JSON: "),
    "no-blocks": (journal(blocks=None), "no 'blocks'"),
    "blocks-a-list": (journal(blocks=[]), "'blocks' is an array, not an object"),
    "fingerprint-a-list": (journal(fingerprint=[1]), "'fingerprint' is an array, not an object"),
    "complete-a-string": (journal(complete="yes"), "'complete' is a string, not a boolean"),
    "micro-batch-zero": (journal(micro_batch=0), "'micro_batch' is 0"),
    "micro-batch-bool": (journal(micro_batch=True), "'micro_batch' is a boolean, not an integer"),
    "block-key": (journal(blocks={"one": record(1)}), "block key 'one' is not a layer number"),
    "block-a-list": (journal(blocks={"0": []}), "block 0 is an array, not an object"),
    "block-no-params": (journal(blocks={"0": record(0, params=None)}), "block 0 has no 'params'"),
    "block-params-strings": (journal(blocks={"0": record(0, params=["1", "2"])}),
                             r"block 0\['params'\] entry is a string, not an integer"),
    "block-params-three": (journal(blocks={"0": record(0, params=[1, 2, 3])}), "has 3 entries, not 2"),
    "block-wrong-layer": (journal(blocks={"0": record(3)}), "block 0 says it is layer 3"),
    "eval-a-list": (journal(eval=[]), "'eval' is an array, not an object"),
    "eval-entry": (journal(eval={"before": {"ppl": 1.0}}), r"'eval'\['before'\] has no 'text_sha256'"),
    "nested-too-deep": (b"[" * 100000 + b"]" * 100000, "not valid JSON: maximum recursion depth exceeded"),
    "huge-number": (b'{"micro_batch": ' + b"9" * 5000 + b"}", "not valid JSON: Exceeds the limit"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", JOURNALS)
def test_damaged_journal_is_one_line(tmp_path, case):
    content, problem = JOURNALS[case]
    out = tmp_path / "out"
    (out / ".streamprune").mkdir(parents=True)
    path = out / ".streamprune" / "journal.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    before = path.read_bytes()
    line = refused(invoke(*run_args(out)), DAMAGED.format(f"(?:{problem})"))
    assert f"{out}/.streamprune is damaged" in line
    assert path.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [".streamprune"]


def test_journal_that_is_not_a_file_is_damaged(tmp_path):
    out = tmp_path / "out"
    (out / ".streamprune" / "journal.json").mkdir(parents=True)
    refused(invoke(*run_args(out)), DAMAGED.format("not a regular file"))
    (out / ".streamprune" / "journal.json").rmdir()
    (out / ".streamprune" / "journal.json").symlink_to("/dev/zero")  # reading it would never end
    refused(invoke(*run_args(out)), DAMAGED.format("not a regular file"))


@pytest.mark.slow
def test_damaged_journal_restarts_with_restart(tmp_path):
    out = tmp_path / "out"
    (out / ".streamprune").mkdir(parents=True)
    (out / ".streamprune" / "journal.json").write_text("[]")
    r = invoke(*run_args(out, "--restart"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / ".streamprune" / "journal.json").read_text())["complete"] is True


# ---- a damaged report -------------------------------------------------------------------

def report(**changes) -> dict:
    r = {"arguments": {"shards": "m", "sparsity": 0.3}, "model": {"model_type": "llama", "layers": 2},
         "blocks": [record(0), record(1)],
         "block_params": {"before": 20, "after": 14, "removed_fraction": 0.3},
         "eval": {"text": "e.txt", "tokens": 100, "seq_len": 16, "ppl_before": 5.0, "ppl_after": 6.0},
         "timing": {"seconds": 1.5, "peak_rss_bytes": 2**29}}
    return {k: v for k, v in dict(r, **changes).items() if v is not None}


REPORTS = {  # id -> (report.json bytes or object, what the error says)
    "array": ([report()], "the file is an array, not an object"),
    "string": ("report", "the file is a string, not an object"),
    "not-utf8": (b'{"blocks": "\xff"}', "not UTF-8 text"),
    "not-json": (b"{", "not valid JSON"),
    "no-blocks": (report(blocks=None), "no 'blocks'"),
    "blocks-an-object": (report(blocks={}), "'blocks' is an object, not an array"),
    "blocks-empty": (report(blocks=[]), "no per-block results"),
    "block-a-number": (report(blocks=[1]), r"'blocks'\[0\] is an integer, not an object"),
    "block-no-heads": (report(blocks=[record(0, heads=None)]), r"'blocks'\[0\] has no 'heads'"),
    "block-heads-string": (report(blocks=[record(0, heads="8")]),
                           r"'blocks'\[0\]\['heads'\] is a string, not an array"),
    "block-heads-one": (report(blocks=[record(0, heads=[8])]), "has 1 entries, not 2"),
    "block-heads-bool": (report(blocks=[record(0, heads=[True, 1])]), "entry is a boolean, not an integer"),
    "block-heads-huge": (report(blocks=[record(0, heads=[10**9, 1])]), r"'blocks'\[0\] has 1000000000 heads"),
    "block-params-negative": (report(blocks=[record(0, params=[-1, 1])]), r"\['params'\] has -1"),
    "block-error-string": (report(blocks=[record(0, relative_error="0.1")]), "'relative_error'\\] is a string"),
    "block-kept-heads": (report(blocks=[record(0, kept_heads="01")]), "'kept_heads'\\] is a string, not an array"),
    "block-layer-float": (report(blocks=[dict(record(0), layer=0.5)]), "'layer'\\] is a number, not an integer"),
    "eval-no-ppl": (report(eval={"text": "e"}), "'eval' has no 'tokens'"),
    "block-params-a-list": (report(block_params=[1]), "'block_params' is an array, not an object"),
    "timing-seconds": (report(timing={"seconds": "1"}), r"'timing'\['seconds'\] is a string"),
    "nested-too-deep": (b"[" * 100000 + b"]" * 100000, "not valid JSON: maximum recursion depth exceeded"),
}


@pytest.mark.parametrize("case", REPORTS)
def test_damaged_report_is_one_line(tmp_path, case):
    content, problem = REPORTS[case]
    (tmp_path / "report.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    refused(invoke("report", tmp_path, "--no-png"),
            rf"^error: {re.escape(str(tmp_path))}/report\.json is damaged or not a streamprune report "
            rf"\(.*(?:{problem}).*\)$")


def test_valid_report_renders_also_with_zero_perplexity(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(report(eval=dict(report()["eval"], ppl_before=0.0))))
    r = invoke("report", tmp_path, "--no-png")
    assert r.exit_code == 0, r.output
    assert "perplexity 0.000 -> 6.000 on e.txt" in r.output


# ---- signals, in real processes ----------------------------------------------------------

def python(code: str, *args, **popen) -> subprocess.CompletedProcess:
    """`python -c code args`, with Ctrl-C as in a terminal unless `popen` says otherwise (a suite started
    in the background, `pytest &`, ignores SIGINT, and the child would inherit it: streamprune keeps an
    inherited SIG_IGN, as nohup asks, and the signal tests would see exit 0)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    popen.setdefault("preexec_fn", default_sigint)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120, **popen)


# `python -m streamprune ARGS` with a signal sent to itself at one moment
AT_IMPORT = """
import builtins, os, runpy, signal, sys
real = builtins.__import__
def hook(name, *a, **k):
    if name == "click":  # imported by streamprune.cli, i.e. while `-m streamprune` imports the command
        builtins.__import__ = real
        os.kill(os.getpid(), SIG)
    return real(name, *a, **k)
SIG = int(sys.argv.pop(1))
builtins.__import__ = hook
runpy.run_module("streamprune", run_name="__main__", alter_sys=True)
"""
# the `streamprune` command: what pip's wrapper for pyproject's entry point does
AT_IMPORT_SCRIPT = AT_IMPORT.replace('runpy.run_module("streamprune", run_name="__main__", alter_sys=True)',
                                     "from streamprune.__main__ import run\nsys.exit(run())")
SWALLOWED = """
import os, runpy, sys, time
import streamprune.cli as cli
class Swallow:  # a signal that lands in __del__ raises there; Python prints "Exception ignored" and goes on
    def __del__(self):
        os.kill(os.getpid(), SIG)
        sum(range(10000))
def main(**kwargs):
    Swallow()
    time.sleep(20)  # the re-sent signal must end this at once
cli.main = main
SIG = int(sys.argv.pop(1))
cli.entry_point()
"""
AFTER_RETURN = """
import os, sys
import streamprune.cli as cli
real_main, real_finish = cli.main, cli.finish
def main(**kwargs):
    try:
        real_main(**kwargs)
    finally:
        if WHEN == "in-click":  # after the command, while click still unwinds
            os.kill(os.getpid(), SIG)
def finish(code):
    if WHEN == "at-exit":  # after the command returned and the handlers stood down
        os.kill(os.getpid(), SIG)
    real_finish(code)
cli.main, cli.finish = main, finish
SIG, WHEN = int(sys.argv.pop(1)), sys.argv.pop(1)
cli.entry_point()
"""


def interrupted_cleanly(p: subprocess.CompletedProcess, sig: int) -> None:
    assert p.returncode == 128 + sig, (p.returncode, p.stderr)
    assert p.stderr.endswith(INTERRUPTED + "\n"), p.stderr
    assert "Traceback" not in p.stderr and "Exception" not in p.stderr, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("launcher", ["python -m", "script"])
def test_signal_while_importing_the_command(sig, launcher):
    p = python(AT_IMPORT if launcher == "python -m" else AT_IMPORT_SCRIPT, int(sig), "--version")
    interrupted_cleanly(p, sig)
    assert p.stdout == ""


def test_the_streamprune_command_installs_the_handlers_before_importing_the_command():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'streamprune = "streamprune.__main__:run"' in pyproject


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_swallowed_by_a_library_is_raised_again(sig):
    p = python(SWALLOWED, int(sig), "--version")
    interrupted_cleanly(p, sig)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["in-click", "at-exit"])
def test_signal_after_the_command_returned(when):
    p = python(AFTER_RETURN, int(signal.SIGINT), when, "--version")
    interrupted_cleanly(p, signal.SIGINT)
    assert "version" in p.stdout


@pytest.mark.slow
def test_ignored_sigint_stays_ignored():
    """nohup and background jobs of a non-interactive shell start with SIGINT ignored."""
    p = python("import signal, streamprune.signals as signals; signals.handle_signals(arm=True); "
               "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "
               "signal.getsignal(signal.SIGTERM) is signals.on_signal)",
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert p.stdout.split() == ["True", "True"], p.stderr


@pytest.mark.parametrize("args,pattern", [
    (("inspect", "--shards", "org/na me"), r"^error: model folder not found: org/na me$"),
    (("inspect", "--shards", "a/b/c"), r"^error: model folder not found: a/b/c$"),
    (("inspect", "--shards", "org/name:rev"), r"^error: model folder not found: org/name:rev$"),
    (("inspect", "--shards", "org/tiny-not-cached"), r"as a Hugging Face Hub id it is not \(completely\) in the cache"),
    (("eval", "--model", MODEL, "--text-dataset", "a:b:c:d"), r"dataset 'a:b:c:d': expected NAME, NAME:SPLIT"),
    (("eval", "--model", MODEL, "--text-dataset", ":"), r"dataset ':': expected NAME"),
    (("eval", "--model", MODEL, "--text-dataset", "name:config:"), r"dataset 'name:config:': expected NAME"),
    (("run", "--shards", MODEL, "--out", "OUT", "--calib-dataset", "x::"), r"dataset 'x::': expected NAME"),
])
def test_malformed_hub_ids_and_dataset_options_are_one_line(tmp_path, args, pattern):
    """(the test suite runs offline: tests/conftest.py)"""
    args = [tmp_path / "out" if a == "OUT" else a for a in args]
    refused(invoke(*args), pattern)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
