"""The lint CI runs with the tests: ruff, configured in pyproject.toml ([tool.ruff]: 120 columns,
pycodestyle, pyflakes, sorted imports), finds nothing in the package, the tests or the tools."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "streamprune", "tests", "tools"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
