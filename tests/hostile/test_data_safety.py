"""The tool deletes only files it wrote, never writes into its input, never runs code shipped with
a model, and never mixes work from different runs or different inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import (
    DEMO,
    child_env,
    digests,
    invoke,
    make_model,
    refused,
    run_args,
    run_cli,
    sha256_tree,
    shard_of,
)

SAMPLES, SEQ_LEN = 4, 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("safety") / "model", layers=2)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety-ref") / "out"
    assert invoke(*run_args(model, out, SAMPLES, SEQ_LEN)).exit_code == 0
    return digests(out)


def user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "inputs-00000.f32.bak").write_text("not ours either")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "notes.txt").write_text("notes")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("where", ["user-folder", "parent-of-input", "out-workdir"])
def test_cache_dir_keeps_every_file_it_did_not_write(model, reference, tmp_path, where):
    out = tmp_path / "out"
    cache_dir = {"user-folder": user_files(tmp_path / "scratch"),
                 "parent-of-input": model.parent,
                 "out-workdir": out / ".streamprune"}[where]
    before = sha256_tree(cache_dir)
    r = invoke(*run_args(model, out, SAMPLES, SEQ_LEN), "--cache-dir", cache_dir)
    assert r.exit_code == 0, (r.output, r.exception)
    assert digests(out) == reference
    after = sha256_tree(cache_dir)
    if where == "out-workdir":  # only the run's own journal and lock are left in its work folder
        assert sorted(after) == ["journal.json", "lock"]
    else:
        assert after == before  # the user's files, and nothing of the run's
    assert not list(cache_dir.glob("streamprune-cache-*"))


@pytest.mark.slow
def test_cache_dir_shared_by_two_concurrent_runs(model, reference, tmp_path):
    """Each output gets its own cache folder inside --cache-dir: two runs at once both give the
    output of a run alone."""
    shared = tmp_path / "cache"
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "streamprune", *run_args(model, o, SAMPLES, SEQ_LEN),
                               "--cache-dir", str(shared)], env=child_env(), stderr=subprocess.PIPE, text=True)
             for o in outs]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    for o in outs:
        assert digests(o) == reference
    assert list(shared.iterdir()) == []


@pytest.mark.slow
def test_cache_folder_not_made_by_streamprune_is_refused(model, tmp_path):
    out = tmp_path / "out"
    r = invoke(*run_args(model, out, SAMPLES, SEQ_LEN), "--cache-dir", tmp_path / "c")
    assert r.exit_code == 0
    # a folder under the name this output's cache would take, holding someone else's file
    r = invoke(*run_args(model, out, SAMPLES, SEQ_LEN), "--cache-dir", tmp_path / "c", "--keep-cache", "--restart")
    assert r.exit_code == 0
    ours = next((tmp_path / "c").iterdir())
    (ours / "streamprune-cache.json").unlink()
    (ours / "theirs.txt").write_text("x")
    before = sha256_tree(tmp_path / "c")
    refused(invoke(*run_args(model, out, SAMPLES, SEQ_LEN), "--cache-dir", tmp_path / "c", "--restart"),
            "is not empty and was not made by streamprune")
    assert sha256_tree(tmp_path / "c") == before


def test_restart_never_clears_a_folder_streamprune_did_not_write(model, tmp_path):
    out = user_files(tmp_path / "models")
    (out / "config.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"someone's weights")
    before = sha256_tree(out)
    refused(invoke(*run_args(model, out, SAMPLES, SEQ_LEN), "--restart"), "is not a streamprune output")
    assert sha256_tree(out) == before


@pytest.mark.slow
def test_restart_discards_the_cache_of_the_previous_run(model, reference, tmp_path):
    """The cache left by an interrupted run with other calibration text is never read by a restarted run."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    other = tmp_path / "other.txt"
    other.write_text(" ".join((DEMO / "calib.txt").read_text().split()[::-1]))
    args = run_args(model, out, SAMPLES, SEQ_LEN)
    args[args.index("--calib") + 1] = str(other)
    assert run_cli(args + ["--cache-dir", str(cache)], fault="after_scoring:1").returncode < 0  # killed
    assert list(cache.glob("*/inputs-00000.f32"))
    r = invoke(*run_args(model, out, SAMPLES, SEQ_LEN), "--cache-dir", cache, "--restart")
    assert r.exit_code == 0, (r.output, r.exception)
    assert digests(out) == reference


@pytest.mark.parametrize("case", ["out-is-input", "out-inside-input", "input-inside-out", "cache-inside-input"])
def test_never_writes_into_the_input(model, tmp_path, case):
    inp = tmp_path / "parent" / "model"
    inp.parent.mkdir()
    os.symlink(model, inp) if case != "input-inside-out" else None
    if case == "input-inside-out":
        inp = model
        out = model.parent
    else:
        out = {"out-is-input": inp, "out-inside-input": inp / "pruned",
               "cache-inside-input": tmp_path / "out"}[case]
    before = sha256_tree(model)
    extra = ["--cache-dir", inp / "cache"] if case == "cache-inside-input" else []
    r = invoke(*run_args(inp, out, SAMPLES, SEQ_LEN), *extra)
    refused(r, "choose " if case != "input-inside-out" else "is inside --out")
    assert sha256_tree(model) == before


EVIL = '''import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("code shipped with the model ran")
from transformers import PreTrainedTokenizerFast, LlamaConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilConfig(LlamaConfig):
    pass
'''


def with_remote_code(model: Path, folder: Path, tokenizer_class: str) -> Path:
    import shutil
    shutil.copytree(model, folder)
    (folder / "evil.py").write_text(EVIL)
    for name, auto_map in (("config.json", {"AutoConfig": "evil.EvilConfig"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTokenizer"]})):
        data = json.loads((folder / name).read_text())
        data["auto_map"] = auto_map
        if name == "tokenizer_config.json":
            data["tokenizer_class"] = tokenizer_class
        (folder / name).write_text(json.dumps(data))
    return folder


def test_model_code_never_runs_even_when_answered_yes(model, tmp_path):
    folder = with_remote_code(model, tmp_path / "evil", "EvilTokenizer")
    out = tmp_path / "out"
    r = invoke(*run_args(folder, out, SAMPLES, SEQ_LEN), input="y\ny\n")
    refused(r, "never runs a model's code")
    assert not (folder / "RAN").exists() and not out.exists()
    r = invoke("eval", "--model", folder, "--text", DEMO / "calib.txt", "--max-windows", 1, "--seq-len", 32,
               input="y\n")
    refused(r, "never runs a model's code")
    assert not (folder / "RAN").exists()


@pytest.mark.slow
def test_model_with_auto_map_but_stock_classes_prunes_without_its_code(model, tmp_path):
    folder = with_remote_code(model, tmp_path / "evil", "PreTrainedTokenizerFast")
    out = tmp_path / "out"
    r = invoke(*run_args(folder, out, SAMPLES, SEQ_LEN))
    assert r.exit_code == 0, (r.output, r.exception)
    assert not (folder / "RAN").exists()
    assert not (out / "evil.py").exists() and "auto_map" not in json.loads((out / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("change", ["config", "weights", "tokenizer"])
def test_resume_refuses_an_input_changed_since_the_interruption(model, tmp_path, change):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    out = tmp_path / "out"
    r = run_cli(run_args(folder, out, SAMPLES, SEQ_LEN), fault="after_scoring:2")
    assert r.returncode < 0, r.stderr
    if change == "config":
        config = json.loads((folder / "config.json").read_text())
        config["rms_norm_eps"] = 1e-3
        (folder / "config.json").write_text(json.dumps(config))
        changed = "config.json"
    elif change == "weights":
        name = "model.layers.1.mlp.up_proj.weight"
        path = shard_of(folder, name)
        tensors = load_file(path)
        tensors[name] = tensors[name] * 1.01
        save_file(tensors, path, metadata={"format": "pt"})
        changed = path.name
    else:
        with open(folder / "tokenizer.json", "a") as f:
            f.write("\n")
        changed = "tokenizer.json"
    r = invoke(*run_args(folder, out, SAMPLES, SEQ_LEN))
    refused(r, "the input model changed since the run")
    assert changed in r.stderr
    assert invoke(*run_args(folder, out, SAMPLES, SEQ_LEN), "--restart").exit_code == 0
