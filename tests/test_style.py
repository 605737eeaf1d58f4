"""The lint CI runs with the tests: ruff, configured in pyproject.toml ([tool.ruff]: 120 columns,
pycodestyle, pyflakes, sorted imports), finds nothing in the package, the tests or the tools."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed, so the lint cannot run: pip install -e '.[test]' (it brings ruff "
                    "0.17, the version pyproject.toml's [tool.ruff] is written for)", pytrace=False)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "streamprune", "tests", "tools"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
