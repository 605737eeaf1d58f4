"""`streamprune report`: the terminal summary of a real run's report.json, and the picture when
matplotlib is installed (without it, one line saying how to get it)."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamprune.cli import main
from streamprune.config import RunConfig
from streamprune.engine import pipeline
from streamprune.output.report import kept_head_map, render_report
from tests.models import save_tiny_model

DEMO = Path(__file__).resolve().parents[2] / "demo"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    src = save_tiny_model(tmp / "in", "llama", layers=3, vocab=512, tokenizer_from=DEMO / "stories260K")
    out = tmp / "out"
    pipeline.run(RunConfig(shards=src, out=out, sparsity=0.3, calib=DEMO / "calib.txt", samples=2, seq_len=16,
                           progress=False, allocation="rule"))  # the rule cuts heads: the table shows both
    return out


@pytest.mark.slow
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
    assert "% removed" in text and "perplexity" not in text and "multiple-of" not in text
    report["arguments"]["multiple_of"] = 8
    assert ", --multiple-of 8 (tensor parallelism)" in render_report(report).splitlines()[1]


@pytest.mark.slow
def test_summary_shows_perplexity_when_measured(out):
    report = json.loads((out / "report.json").read_text())
    report["eval"] = {"text": "eval.txt", "seq_len": 16, "tokens": 150, "ppl_before": 5.0, "ppl_after": 6.0}
    assert "perplexity 5.000 -> 6.000 (+20.0%) on eval.txt" in render_report(report)


def test_kept_head_map_marks_kept_heads():
    blocks = [{"heads": [4, 2], "kept_heads": [1, 3]}, {"heads": [4, 2], "kept_heads": [0, 1]}]
    assert kept_head_map(blocks) == [[0, 1, 0, 1], [1, 1, 0, 0]]


@pytest.mark.slow
def test_cli_writes_the_picture(out, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the picture (the test extra installs it)")
    png = tmp_path / "prune.png"
    r = CliRunner().invoke(main, ["report", str(out), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert f"picture: {png}" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_without_matplotlib_says_how_to_install(out, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = CliRunner().invoke(main, ["report", str(out), "--png", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == "no picture: matplotlib is not installed (pip install 'streamprune[plot]')"
    assert not (tmp_path / "x.png").exists()


def test_missing_report_is_an_error(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: no report.json")


def test_a_folder_that_does_not_exist_is_not_found(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path / "kjv-ot")])
    assert r.exit_code == 2 and r.output == f"error: not found: {tmp_path / 'kjv-ot'}\n"


def synthetic_report(blocks: list[dict]) -> dict:
    timing = [{"score_seconds": 1.0 + i, "forward_seconds": 0.5, "seconds": 2.0 + i} for i in range(len(blocks))]
    return {"arguments": {"shards": "m", "sparsity": 0.3, "method": "perturb"}, "blocks": blocks,
            "timing": {"seconds": 9.0, "blocks": timing}}


def block(layer, heads, kv, kept_heads, neurons=(96, 60), dropped=False):
    b = {"layer": layer, "heads": [8, heads], "kv_heads": [4, kv], "neurons": list(neurons),
         "params": [1000, 0 if dropped else 500 + heads + neurons[1]], "kept_heads": kept_heads, "relative_error": 0.1}
    return dict(b, dropped=True) if dropped else b


def figure_of(report, whole=False):
    pytest.importorskip("matplotlib", reason="matplotlib draws the picture (the test extra installs it)")
    from streamprune.output.report import report_figure
    fig = report_figure(report)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return fig if whole else fig.axes


def by_title(axes) -> dict:
    return {a.get_title(): a for a in axes}


def test_head_map_has_a_legend_and_kv_group_lines():
    blocks = [block(0, 8, 4, list(range(8))), block(1, 4, 2, [0, 1, 4, 5], neurons=(96, 40)),
              block(2, 0, 0, [], neurons=(96, 0), dropped=True)]
    heads = by_title(figure_of(synthetic_report(blocks)))["attention heads per layer"]
    legend = [t.get_text() for t in heads.get_legend().get_texts()]
    assert legend == ["head kept", "head removed", "block dropped", "KV group boundary"]
    lines = next(c for c in heads.collections if c.get_label() == "KV group boundary")
    segments = sorted((float(s[0][0]), float(s[0][1]), float(s[1][1])) for s in lines.get_segments())
    # 4 KV groups of 2 heads: lines between heads 1|2, 3|4, 5|6 in every row
    assert segments == sorted((x, r - 0.5, r + 0.5) for x in (1.5, 3.5, 5.5) for r in range(3))


def test_per_block_what_was_kept_and_what_it_cost():
    blocks = [block(0, 8, 4, list(range(8))), block(1, 4, 2, [0, 1, 4, 5], neurons=(96, 40)),
              block(2, 0, 0, [], neurons=(96, 0), dropped=True)]
    axes = by_title(figure_of(synthetic_report(blocks)))
    assert set(axes) == {"kept per block", "what it cost: relative reconstruction error of the block's output",
                         "attention heads per layer"}
    kept = axes["kept per block"]
    lines = {line.get_label(): list(line.get_ydata()) for line in kept.get_lines()}
    assert lines["query heads"] == [100.0, 50.0, 0.0] and lines["MLP neurons"][1] == pytest.approx(100 * 40 / 96)
    legend = [t.get_text() for t in kept.get_legend().get_texts()]
    assert legend == ["query heads", "KV heads", "MLP neurons", "parameters", "block dropped"]
    assert kept.get_legend().get_bbox_to_anchor().y0 > kept.get_window_extent().y1  # above the plot, not on it


def test_no_head_map_when_every_head_is_kept_and_the_title_names_the_window():
    blocks = [block(i, 8, 4, list(range(8)), neurons=(96, 50 + i)) for i in range(3)]
    report = synthetic_report(blocks)
    report["eval"] = {"text": "/x/eval.txt", "seq_len": 256, "windows": 90, "tokens": 22950, "ppl_before": 20.0,
                      "ppl_after": 25.0}
    axes = figure_of(report)
    assert [a.get_title() for a in axes] == ["kept per block (every query head kept)",
                                             "what it cost: relative reconstruction error of the block's output"]
    from streamprune.output.report import figure_title
    assert figure_title(report).splitlines()[1] == ("perplexity 20.000 -> 25.000 (+25.0%) on eval.txt, 90 windows "
                                                    "of 256 tokens")


@pytest.mark.slow
def test_summary_says_what_the_time_covers(out):
    report = json.loads((out / "report.json").read_text())
    assert "s of setup, survey, pruning and writing" in render_report(report)
    report["timing"].update(sessions=2, eval_seconds={"before": 1.5, "after": 2.0}, wall_seconds_total=20.0)
    line = render_report(report).splitlines()[-1]
    assert "writing over 2 sessions; evaluation 3.5s; 20.0s in all" in line


@pytest.mark.parametrize("heads_kept", [8, 4])
def test_the_title_fits_the_picture_with_or_without_the_head_map(heads_kept):
    blocks = [block(i, heads_kept, 4, list(range(heads_kept)), neurons=(96, 50 + i)) for i in range(3)]
    report = synthetic_report(blocks)
    report["arguments"].update(shards="/models/kjv-llama-6.8m", allocation="global")
    report["block_params"] = {"before": 4721664, "after": 3305472, "removed_fraction": 0.3}
    report["eval"] = {"text": "/data/kjv/eval.txt", "seq_len": 256, "windows": 91, "tokens": 23205,
                      "ppl_before": 35.95, "ppl_after": 38.336}
    fig = figure_of(report, whole=True)
    fig.canvas.draw()
    title, frame = fig._suptitle.get_window_extent(), fig.bbox
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1, (title, frame)
    assert "(30.0% removed)" in fig._suptitle.get_text().replace("\n", " ")


def test_a_picture_format_matplotlib_cannot_write_is_one_line(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the picture (the test extra installs it)")
    from streamprune.errors import StreamPruneError
    from streamprune.output.report import plot_report
    report = synthetic_report([block(0, 8, 4, list(range(8)))])
    with pytest.raises(StreamPruneError, match=r"cannot draw the picture as \.safetensors .*\.pdf, .*\.png"):
        plot_report(report, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert plot_report(report, tmp_path / "picture") and (tmp_path / "picture").read_bytes()[:4] == b"\x89PNG"
