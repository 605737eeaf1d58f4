"""run --survey-only: the survey alone, each block's shape at several sparsities with the cost the
allocation predicts, nothing pruned; a later run into the same folder at any sparsity (or other
survey-free arguments) reuses the survey, and so does any number of runs into other folders with
--survey-from; each writes the bytes a run from scratch writes."""

import json
from pathlib import Path

import pytest

import streamprune
from streamprune.engine import pipeline
from streamprune.errors import StreamPruneError
from tests.harness import digests, invoke, refused
from tests.models import TINYSTORIES, save_tiny_model

ARGS = ["--calib", str(TINYSTORIES / "calib.txt"), "--samples", "8", "--seq-len", "64", "--quiet"]
SKIP = {"report.json", "streamprune.log", "README.md"}  # (they name the folder and the time)


def run(model: Path, out: Path, *extra) -> str:
    r = invoke("run", "--shards", model, "--out", out, *ARGS, *extra)
    assert r.exit_code == 0, r.output + r.stderr
    return r.stdout


def tiny(tmp_path: Path, layers: int) -> Path:
    return save_tiny_model(tmp_path / "in", "llama", layers=layers, vocab=512,
                           tokenizer_from=TINYSTORIES / "stories260K")


def same_model(a: Path, b: Path) -> bool:
    return {k: v for k, v in digests(a).items() if k not in SKIP} == {k: v for k, v in digests(b).items()
                                                                       if k not in SKIP}


@pytest.mark.slow
def test_survey_only_previews_and_a_later_run_reuses_it(tmp_path):
    model, out = tiny(tmp_path, 3), tmp_path / "out"
    text = run(model, out, "--sparsity", "0.3", "--survey-only", "--preview", "0.5,0.2")
    lines = text.splitlines()
    assert lines[0].startswith("shapes per block (query heads/KV heads/neurons; input 8/2/96)")
    assert lines[1].split() == ["block", "input", "at", "0.2", "at", "0.3", "at", "0.5"]
    removed = next(line for line in lines if line.strip().startswith("removed")).split()[1:]
    # what each column's sparsity asks, or up to one aligned neuron step more (32 of 96 neurons in a
    # block: 7% of this tiny model), never less
    got = [float(r.rstrip("%")) for r in removed]
    assert all(want <= r < want + 7 for r, want in zip(got, (20, 30, 50))) and len(got) == 3, got
    costs = [float(c) for c in next(line for line in lines if line.strip().startswith("cost ")).split()[1:]]
    assert costs == sorted(costs) and costs[0] >= 0  # more removed, more cost
    assert f"--survey-from {out} --out NEW" in lines[-1]
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
    assert same_model(out, fresh)


@pytest.mark.slow
def test_one_survey_serves_any_number_of_prunings_into_other_folders(tmp_path):
    """--survey-from: each pruning (CLI or API) surveys nothing and writes what a run from scratch writes."""
    model, survey = tiny(tmp_path, 2), tmp_path / "survey"
    run(model, survey, "--survey-only")
    for sparsity, extra in (("0.3", ()), ("0.5", ()), ("0.5", ("--allocation", "uniform", "--method", "wanda-sp"))):
        reused, fresh = tmp_path / f"reused-{sparsity}-{len(extra)}", tmp_path / f"fresh-{sparsity}-{len(extra)}"
        run(model, reused, "--sparsity", sparsity, "--survey-from", survey, *extra)
        log = (reused / "streamprune.log").read_text()
        assert "surveyed block" not in log and f"reusing the survey of 2 blocks from {survey}" in log
        run(model, fresh, "--sparsity", sparsity, *extra)
        assert same_model(reused, fresh)
    api = streamprune.prune(model, tmp_path / "api", 0.5, TINYSTORIES / "calib.txt", samples=8, seq_len=64,
                            survey_from=str(survey))
    assert same_model(tmp_path / "api", tmp_path / "fresh-0.5-0") and api.removed_fraction > 0.45


@pytest.mark.slow
def test_a_survey_that_does_not_fit_the_run_is_refused_in_one_line(tmp_path):
    model, survey = tiny(tmp_path, 2), tmp_path / "survey"
    run(model, survey, "--survey-only")
    other = save_tiny_model(tmp_path / "other", "qwen2", layers=2, vocab=512,
                            tokenizer_from=TINYSTORIES / "stories260K")
    o = tmp_path / "o"
    for shards, options, pattern in [  # the API's options; the command line's the same
            (model, dict(samples=4), r"differs from this run in the calibration \(--samples\)"),
            (model, dict(seed=1), r"differs from this run in the options \(--seed\)"),
            (other, {}, r"differs from this run in the model \(it surveyed .*in\)"),
            (model, dict(allocation="rule"), "--survey-from gives costs for --allocation global or uniform"),
            (model, dict(out=survey), "is --out itself"),
            (model, dict(survey_from=tmp_path), "holds no streamprune run")]:
        options = dict(dict(out=o, samples=8, seq_len=64, survey_from=survey), **options)
        with pytest.raises(StreamPruneError, match=pattern):
            streamprune.prune(shards, calib=TINYSTORIES / "calib.txt", **options)
        flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", v)]
        refused(invoke("run", "--shards", shards, "--calib", TINYSTORIES / "calib.txt", "--quiet", *flags), pattern)
    assert not (o / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_the_embeddings_are_written_once_for_the_survey_and_the_pruning_pass(tmp_path, monkeypatch):
    written = []
    real = pipeline.write_embeddings
    monkeypatch.setattr(pipeline, "write_embeddings", lambda *a: written.append(1) or real(*a))
    run(tiny(tmp_path, 2), tmp_path / "out", "--sparsity", "0.3")
    assert len(written) == 1  # the survey leaves block 0's inputs for the pruning pass


@pytest.mark.slow
def test_a_run_that_pruned_is_not_reused_with_another_sparsity_in_its_folder(tmp_path):
    model, out = tiny(tmp_path, 2), tmp_path / "out"
    run(model, out, "--sparsity", "0.3")
    r = invoke("run", "--shards", model, "--out", out, *ARGS, "--sparsity", "0.5")
    refused(r, r"holds a run with different arguments \(sparsity\)", f"--survey-from {out} --out NEW")


def test_survey_only_with_the_fixed_rule_is_refused(tmp_path):
    model = tiny(tmp_path, 2)
    r = invoke("run", "--shards", model, "--out", tmp_path / "o", *ARGS, "--survey-only", "--allocation", "rule")
    refused(r, "--survey-only measures costs for --allocation global or uniform")
