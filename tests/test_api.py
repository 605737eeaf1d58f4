"""The Python API is the command's job without the command line: streamprune.prune writes what
`streamprune run` writes, resumes as it does, returns the report's figures, and refuses what it
refuses with the same one line (as StreamPruneError)."""

import json
from pathlib import Path

import pytest

import streamprune
from streamprune.errors import StreamPruneError
from tests.harness import DEMO, digests, interrupt_pruning_at, invoke

MODEL, CALIB = DEMO / "stories260K", DEMO / "calib.txt"
ARGS = dict(samples=4, seq_len=64, progress=False)


@pytest.mark.slow
def test_prune_writes_what_run_writes_and_returns_the_report(tmp_path):
    r = streamprune.prune(MODEL, tmp_path / "api", 0.3, CALIB, **ARGS)
    cli = invoke("run", "--shards", MODEL, "--out", tmp_path / "cli", "--calib", CALIB, "--samples", 4,
                 "--seq-len", 64, "--quiet")
    assert cli.exit_code == 0, cli.output
    assert digests(tmp_path / "api") == digests(tmp_path / "cli")
    report = json.loads((tmp_path / "api" / "report.json").read_text())
    assert r.report == report and r.out == tmp_path / "api"
    assert (r.params_before, r.params_after) == (report["block_params"]["before"], report["block_params"]["after"])
    assert r.removed_fraction == pytest.approx(0.3, abs=0.02)
    assert r.seconds > 0 and r.peak_rss_bytes > 0 and r.dense_passes > 0
    assert r.ppl_before is None and r.ppl_after is None  # no eval text given
    assert f"{r.params_before:,} -> {r.params_after:,}" in cli.output


@pytest.mark.slow
def test_prune_resumes_an_interrupted_run_to_the_same_bytes(tmp_path, monkeypatch):
    reference = streamprune.prune(MODEL, tmp_path / "whole", 0.3, CALIB, **ARGS)
    undo = interrupt_pruning_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        streamprune.prune(MODEL, tmp_path / "cut", 0.3, CALIB, **ARGS)
    undo()
    assert "interrupted (Ctrl-C); finished blocks are saved" in (tmp_path / "cut" / "streamprune.log").read_text()
    resumed = streamprune.prune(MODEL, tmp_path / "cut", 0.3, CALIB, **ARGS)
    assert resumed.report["timing"]["sessions"] == 2
    assert digests(tmp_path / "cut") == digests(tmp_path / "whole")
    again = streamprune.prune(MODEL, tmp_path / "cut", 0.3, CALIB, **ARGS)  # complete: nothing to do
    assert again.report == resumed.report and reference.params_after == again.params_after


@pytest.mark.slow
def test_eval_gives_the_perplexities(tmp_path):
    r = streamprune.prune(MODEL, tmp_path / "o", 0.3, CALIB, eval=DEMO / "eval.txt", eval_seq_len=64, **ARGS)
    assert r.ppl_before > 1 and r.ppl_after > r.ppl_before
    assert r.report["eval"]["ppl_after"] == r.ppl_after


@pytest.mark.slow
def test_survey_only_returns_every_blocks_costs(tmp_path):
    r = streamprune.prune(MODEL, tmp_path / "o", 0.3, CALIB, survey_only=True, **ARGS)
    assert r.report is None and len(r.costs) == len(r.input_blocks) == 5
    assert [p.sparsity for p in r.previews] == [0.2, 0.3, 0.4, 0.5]  # --sparsity and the default preview
    assert all(len(p.blocks) == 5 and p.removed_fraction > p.sparsity - 1e-9 for p in r.previews), r.previews
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("kwargs, cli", [
    (dict(sparsity=1.5), ["--sparsity", "1.5"]),
    (dict(method="oracle"), ["--method", "oracle"]),
    (dict(model="nowhere/at/all/model"), ["--shards", "nowhere/at/all/model"]),
    (dict(calib="missing.txt"), ["--calib", "missing.txt"]),
    (dict(survey_only=True, preview=[0.2, 1.5]), ["--survey-only", "", "--preview", "0.2,1.5"]),
])
def test_refusals_are_the_commands_one_line(tmp_path, kwargs, cli):
    kwargs = dict(dict(model=MODEL, out=tmp_path / "o", calib=CALIB), **kwargs)
    with pytest.raises(StreamPruneError) as e:
        streamprune.prune(**kwargs, **ARGS)
    args = dict(zip(["--shards", "--out", "--calib"], [MODEL, tmp_path / "o", CALIB]), **dict(zip(cli[::2], cli[1::2])))
    r = invoke("run", *[x for kv in args.items() for x in kv if x != ""], "--samples", 4, "--seq-len", 64, "--quiet")
    assert r.exit_code == 2 and r.output == f"error: {e.value}\n", (r.output, str(e.value))
    assert "\n" not in str(e.value)


def test_an_unknown_option_is_refused(tmp_path):
    with pytest.raises(StreamPruneError, match="unknown option smaples"):
        streamprune.prune(MODEL, tmp_path / "o", 0.3, CALIB, smaples=4)
    with pytest.raises(StreamPruneError, match="unknown options restrat, shards"):
        streamprune.prune(MODEL, tmp_path / "o", 0.3, CALIB, shards=MODEL, restrat=True)


def test_an_os_error_becomes_the_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StreamPruneError) as e:
        streamprune.prune(MODEL, tmp_path / "file" / "out", 0.3, CALIB, **ARGS)
    r = invoke("run", "--shards", MODEL, "--out", tmp_path / "file" / "out", "--calib", CALIB, "--samples", 4,
               "--seq-len", 64, "--quiet")
    assert r.output == f"error: {e.value}\n"


def test_out_of_memory_is_the_commands_line(tmp_path, monkeypatch):
    from streamprune.engine import pipeline

    def no_memory(*args):
        raise MemoryError

    monkeypatch.setattr(pipeline, "run_ranks", no_memory)
    with pytest.raises(StreamPruneError, match="^out of memory; lower --batch-size or --samples$"):
        streamprune.prune(MODEL, tmp_path / "o", 0.3, CALIB, **ARGS)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(sparsity="0.3"), r"^sparsity must be a number, got '0\.3' \(str\)$"),
    (dict(max_memory=[24]), r"^max_memory must be a size in bytes .*got \[24\] \(list\)$"),
    (dict(max_memory="24 parsecs"), r"^max_memory: cannot read '24 parsecs' as a size"),
    (dict(samples=4.0), r"^samples must be an integer, got 4\.0 \(float\)$"),
    (dict(seed=True), r"^seed must be an integer, got True \(bool\)$"),
    (dict(calib=3), r"^calib must be a path \(str or Path\), got 3 \(int\)$"),
    (dict(allocation=None), r"^allocation must be one of global, uniform, rule, got None \(NoneType\)$"),
    (dict(keep_cache="yes"), r"^keep_cache must be True or False, got 'yes' \(str\)$"),
    (dict(model=None), r"^model must be a path \(str or Path\), got None \(NoneType\)$"),
])
def test_a_wrong_type_is_refused_naming_the_option(tmp_path, kwargs, pattern):
    kwargs = dict(dict(model=MODEL, out=tmp_path / "o", calib=CALIB), **kwargs)
    with pytest.raises(StreamPruneError, match=pattern):
        streamprune.prune(**kwargs)
    assert not (tmp_path / "o").exists()


def test_values_are_taken_as_the_command_line_takes_them():
    from streamprune.api import checked_options
    options = checked_options(dict(max_memory="24GiB", sparsity=1 - 1, calib="c.txt", cache_dir=None, eval_seq_len=64,
                                   compensate=False))
    assert options == dict(max_memory=24 * 2**30, sparsity=0.0, calib=Path("c.txt"), cache_dir=None, eval_seq_len=64,
                           compensate=False)
    assert isinstance(options["sparsity"], float)


@pytest.mark.parametrize("error", [lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to "
                                                                                 "allocate 2.00 GiB"),
                                   lambda: RuntimeError("CUDA error: out of memory")])
def test_gpu_out_of_memory_is_one_line_with_the_advice(tmp_path, monkeypatch, error):
    from streamprune.engine import pipeline

    def no_memory(*args):
        raise error()

    monkeypatch.setattr(pipeline, "run_ranks", no_memory)
    with pytest.raises(StreamPruneError, match="^out of GPU memory; lower --batch-size or --samples"):
        streamprune.prune(MODEL, tmp_path / "o", 0.3, CALIB, **ARGS)
    r = invoke("run", "--shards", MODEL, "--out", tmp_path / "o", "--calib", CALIB, "--quiet")
    assert r.exit_code == 2 and r.stderr.startswith("error: out of GPU memory") and r.stderr.count("\n") == 1


def test_a_report_of_an_older_version_gives_what_it_holds():
    from streamprune.api import PruneResult
    r = PruneResult.of_report(Path("o"), {"blocks": [], "timing": {"seconds": 3.0}})
    assert (r.seconds, r.params_before, r.peak_rss_bytes, r.ppl_after) == (3.0, None, None, None)
