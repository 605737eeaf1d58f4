"""`streamprune report`: the terminal summary of a real run's report.json, and the picture when
matplotlib is installed (without it, one line saying how to get it)."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamprune import pipeline
from streamprune.cli import main
from streamprune.config import RunConfig
from streamprune.report import kept_head_map, render_report
from tests.models import save_tiny_model

DEMO = Path(__file__).resolve().parents[1] / "demo"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    src = save_tiny_model(tmp / "in", "llama", layers=3, vocab=512, tokenizer_from=DEMO / "stories260K")
    out = tmp / "out"
    pipeline.run(RunConfig(shards=src, out=out, sparsity=0.3, calib=DEMO / "calib.txt", samples=2, seq_len=16,
                           progress=False, allocation="rule"))  # the rule cuts heads: the table shows both
    return out


def test_terminal_summary_has_a_row_per_layer(out):
    report = json.loads((out / "report.json").read_text())
    text = render_report(report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    rows = lines[header + 2:header + 2 + 3]
    for layer, (row, block) in enumerate(zip(rows, report["blocks"])):
        cells = row.split()
        assert cells[0] == str(layer)
        assert cells[1] == f"{block['heads'][0]}->{block['heads'][1]}"
        assert cells[5] == f"{block['relative_error']:.4f}"
        assert cells[6:] == [str(h) for h in block["kept_heads"]]
    assert "% removed" in text and "perplexity" not in text


def test_summary_shows_perplexity_when_measured(out):
    report = json.loads((out / "report.json").read_text())
    report["eval"] = {"text": "eval.txt", "seq_len": 16, "tokens": 150, "ppl_before": 5.0, "ppl_after": 6.0}
    assert "perplexity 5.000 -> 6.000 (+20.0%) on eval.txt" in render_report(report)


def test_kept_head_map_marks_kept_heads():
    blocks = [{"heads": [4, 2], "kept_heads": [1, 3]}, {"heads": [4, 2], "kept_heads": [0, 1]}]
    assert kept_head_map(blocks) == [[0, 1, 0, 1], [1, 1, 0, 0]]


def test_cli_writes_the_picture(out, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "prune.png"
    r = CliRunner().invoke(main, ["report", str(out), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert f"picture: {png}" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_says_how_to_install(out, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = CliRunner().invoke(main, ["report", str(out), "--png", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "no picture: matplotlib is not installed (pip install 'streamprune[plot]')"
    assert not (tmp_path / "x.png").exists()


def test_missing_report_is_an_error(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: no report.json")
