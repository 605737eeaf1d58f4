"""The command line: inspect prints the plan, run prunes, errors are one line with exit 2."""

import json
import re
from pathlib import Path

import pytest

from tests.harness import invoke

DEMO = Path(__file__).resolve().parents[1] / "demo"


def test_inspect_prints_model_and_plan():
    r = invoke("inspect", "--shards", DEMO / "stories260K", "--sparsity", 0.3)
    assert r.exit_code == 0, r.output
    assert "llama: 5 layers, hidden 64, 8 heads / 4 KV heads" in r.output
    assert "fixed rule (--allocation rule) at sparsity 0.3" in r.output
    info = json.loads(invoke("inspect", "--shards", DEMO / "stories260K", "--json").output)
    assert info["plan"]["removed_fraction"] > 0.25


@pytest.mark.slow
def test_run_prunes_the_demo_model(tmp_path):
    r = invoke("run", "--shards", DEMO / "stories260K", "--out", tmp_path / "out", "--calib", DEMO / "calib.txt",
               "--samples", 4, "--seq-len", 64, "--quiet")
    assert r.exit_code == 0, r.output
    assert "% removed" in r.output
    assert re.search(r"of setup, survey, pruning and writing = [\d.]+ dense passes \(one: [\d.]+s\)", r.output)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_compensation_options():
    from streamprune.cli import run
    parse = lambda *a: run.make_context("run", ["--shards", "m", "--out", "o", *a]).params["compensate"]  # noqa: E731
    assert parse() == "lsq"
    assert parse("--no-compensate") == parse("--compensate", "none") == "none"
    assert parse("--compensate", "mean") == "mean"


def test_a_sparsity_given_as_a_percentage_gets_the_fraction_in_the_message(tmp_path):
    r = invoke("run", "--shards", DEMO / "stories260K", "--out", tmp_path / "o", "--sparsity", 30)
    assert r.exit_code == 2 and "got 30.0 (a fraction: --sparsity 0.3 for 30%)" in r.output, r.output


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    cases = [
        ("run", "--shards", DEMO / "stories260K", "--out", tmp_path / "o", "--sparsity", 1.5),
        ("run", "--shards", tmp_path / "nope", "--out", tmp_path / "o", "--calib", DEMO / "calib.txt"),
        ("inspect", "--shards", tmp_path),
    ]
    for args in cases:
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output


@pytest.mark.slow
def test_help_does_not_import_torch_or_transformers():
    """`streamprune --help` and `inspect --help` answer at once: nothing heavy at import."""
    import subprocess
    import sys
    code = ("import sys; from click.testing import CliRunner; from streamprune.cli import main; "
            "r = CliRunner().invoke(main, ['inspect', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
