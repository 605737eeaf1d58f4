"""run --survey-only: the survey alone, each block's shape at several sparsities with the cost the
allocation predicts, nothing pruned; a later run into the same folder at any sparsity (or other
survey-free arguments) reuses the survey and writes the bytes a run from scratch writes."""

import json
from pathlib import Path

from click.testing import CliRunner

from streamprune.cli import main
from streamprune.engine import pipeline
from tests.harness import digests
from tests.models import TINYSTORIES, save_tiny_model

ARGS = ["--calib", str(TINYSTORIES / "calib.txt"), "--samples", "8", "--seq-len", "64", "--quiet"]


def run(model: Path, out: Path, *extra) -> str:
    r = CliRunner().invoke(main, ["run", "--shards", str(model), "--out", str(out), *ARGS, *extra])
    assert r.exit_code == 0, r.output + r.stderr
    return r.stdout


def test_survey_only_previews_and_a_later_run_reuses_it(tmp_path):
    model = save_tiny_model(tmp_path / "in", "llama", layers=3, vocab=512, tokenizer_from=TINYSTORIES / "stories260K")
    out = tmp_path / "out"
    text = run(model, out, "--sparsity", "0.3", "--survey-only", "--preview", "0.5,0.2")
    lines = text.splitlines()
    assert lines[0].startswith("shapes per block (query heads/KV heads/neurons; input 8/2/96)")
    assert lines[1].split() == ["block", "input", "at", "0.2", "at", "0.3", "at", "0.5"]
    removed = next(line for line in lines if line.strip().startswith("removed")).split()[1:]
    assert [float(r.rstrip("%")) for r in removed] == [20.0, 30.0, 50.0] or len(removed) == 3
    costs = [float(c) for c in next(line for line in lines if line.strip().startswith("cost ")).split()[1:]]
    assert costs == sorted(costs) and costs[0] >= 0  # more removed, more cost
    assert not (out / "model.safetensors.index.json").exists()  # nothing pruned
    log = (out / "streamprune.log").read_text()
    assert log.count("surveyed block") == 3

    run(model, out, "--sparsity", "0.5")  # reuses the survey
    log = (out / "streamprune.log").read_text()
    assert log.count("surveyed block") == 3 and "reusing the survey of 3 blocks" in log
    shape = json.loads((out / "report.json").read_text())["plan"]
    preview_05 = [line.split()[-1] for line in lines[3:6]]
    assert [f"{h}/{kv}/{n}" for h, kv, n in zip(shape["heads"], shape["kv_heads"], shape["neurons"])] == preview_05

    fresh = tmp_path / "fresh"
    run(model, fresh, "--sparsity", "0.5")
    skip = {"report.json", "streamprune.log", "README.md"}
    assert {k: v for k, v in digests(out).items() if Path(k).name not in skip} == \
        {k: v for k, v in digests(fresh).items() if Path(k).name not in skip}


def test_the_embeddings_are_written_once_for_the_survey_and_the_pruning_pass(tmp_path, monkeypatch):
    written = []
    real = pipeline.write_embeddings
    monkeypatch.setattr(pipeline, "write_embeddings", lambda *a: written.append(1) or real(*a))
    model = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=TINYSTORIES / "stories260K")
    run(model, tmp_path / "out", "--sparsity", "0.3")
    assert len(written) == 1  # the survey leaves block 0's inputs for the pruning pass


def test_a_run_that_pruned_is_not_reused_with_another_sparsity(tmp_path):
    model = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=TINYSTORIES / "stories260K")
    out = tmp_path / "out"
    run(model, out, "--sparsity", "0.3")
    r = CliRunner().invoke(main, ["run", "--shards", str(model), "--out", str(out), *ARGS,
                                                  "--sparsity", "0.5"])
    assert r.exit_code == 2 and "different arguments" in r.stderr


def test_survey_only_with_the_fixed_rule_is_refused(tmp_path):
    model = save_tiny_model(tmp_path / "in", "llama", layers=2, vocab=512, tokenizer_from=TINYSTORIES / "stories260K")
    r = CliRunner().invoke(main, ["run", "--shards", str(model), "--out", str(tmp_path / "o"), *ARGS,
                                                  "--survey-only", "--allocation", "rule"])
    assert r.exit_code == 2 and "--survey-only measures costs for --allocation global or uniform" in r.stderr
