"""hub.py: a Hugging Face Hub id for --shards / --model, offline against a Hub cache laid out in a
temporary folder as huggingface_hub writes it (models--org--name/{blobs,refs/main,snapshots/<commit>},
the snapshot's files symlinks into blobs). Nothing is downloaded: HF_HUB_OFFLINE is set for every
test, and the one test of what would be downloaded replaces snapshot_download."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamprune.errors import StreamPruneError
from streamprune.inputs.hub import SMALL_FILES, is_hub_id, resolve_model
from tests.harness import DEMO, ROOT, invoke, make_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RUN = ["--samples", 4, "--seq-len", 32, "--sparsity", 0.3, "--quiet", "--calib", DEMO / "calib.txt"]
EVAL = ["--text", DEMO / "eval.txt", "--seq-len", 64, "--max-windows", 3, "--json", "--quiet"]


def cache_model(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """`source`'s files as the Hub cache holds a downloaded snapshot of `repo_id`; the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path/hub, offline (the environment for children, the constants
    huggingface_hub read at import for this process)."""
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "model", layers=2)


def model_files(out: Path) -> dict:
    """Every output file's bytes; report.json without the input's path and the timing; not the log
    (its times and paths differ); the model card without its base_model line (the Hub id, or the
    folder's name)."""
    files = {f.name: f.read_bytes() for f in sorted(out.iterdir())
             if f.is_file() and f.name not in ("report.json", "streamprune.log", "README.md")}
    lines = (out / "README.md").read_text().split("\n")
    files["README.md"] = [line for i, line in enumerate(lines) if i not in (1, 9)]  # base_model, title
    report = json.loads((out / "report.json").read_text())
    report.pop("timing")
    report["arguments"].pop("shards")
    return dict(files, report=report)


@pytest.mark.parametrize("text,expected", [
    ("meta-llama/Llama-3.1-8B", True), ("org/tiny", True), ("Qwen/Qwen3-0.6B", True),
    ("./org/tiny", False), ("/abs/model", False), ("~/model", False), ("a/b/c", False), ("model", False),
    ("org/..", False), ("org--x/y", False), ("org/name.git", False), ("org/", False), ("org/na me", False),
])
def test_what_counts_as_a_hub_id(text, expected):
    assert is_hub_id(text) is expected


@pytest.mark.slow
def test_run_on_a_hub_id_writes_what_a_run_on_the_folder_writes(offline_cache, tiny, tmp_path):
    snapshot = cache_model(offline_cache, "org/tiny", tiny)
    r = invoke("run", "--shards", "org/tiny", "--out", tmp_path / "from-hub", *RUN)
    assert r.exit_code == 0, r.output
    assert f"org/tiny: Hugging Face Hub snapshot {snapshot}" in r.output
    r = invoke("run", "--shards", tiny, "--out", tmp_path / "from-folder", *RUN)
    assert r.exit_code == 0, r.output
    assert model_files(tmp_path / "from-hub") == model_files(tmp_path / "from-folder")
    assert "base_model: org/tiny\n" in (tmp_path / "from-hub" / "README.md").read_text()
    # the output's companion files are copies, not links into the Hub cache
    assert not any(f.is_symlink() for f in (tmp_path / "from-hub").iterdir())
    # the same command resumes (here: finds the run complete), the Hub id resolving to the same snapshot
    assert invoke("run", "--shards", "org/tiny", "--out", tmp_path / "from-hub", *RUN).exit_code == 0


@pytest.mark.slow
def test_eval_inspect_and_plan_take_a_hub_id(offline_cache, tiny):
    cache_model(offline_cache, "org/tiny", tiny)
    from_hub = invoke("eval", "--model", "org/tiny", *EVAL)
    from_folder = invoke("eval", "--model", tiny, *EVAL)
    assert from_hub.exit_code == 0 and from_folder.exit_code == 0, from_hub.output + from_folder.output
    ppl = lambda r: json.loads(r.stdout)["ppl"]  # noqa: E731
    assert ppl(from_hub) == ppl(from_folder)
    assert invoke("inspect", "--shards", "org/tiny", "--json").exit_code == 0
    r = invoke("plan", "--shards", "org/tiny", "--no-timing", "--samples", 4, "--seq-len", 32)
    assert r.exit_code == 0, r.output


def test_a_revision_picks_a_cached_commit(offline_cache, tiny, tmp_path):
    other = "f" * 40
    cache_model(offline_cache, "org/tiny", tiny)
    (offline_cache / "models--org--tiny" / "snapshots" / other).mkdir()  # an empty snapshot: an unfinished one
    assert resolve_model("org/tiny", COMMIT).name == COMMIT
    with pytest.raises(StreamPruneError, match="is missing config.json"):
        resolve_model("org/tiny", other)


@pytest.mark.slow
def test_a_local_path_is_never_taken_for_a_hub_id(offline_cache, tiny, tmp_path, monkeypatch):
    cache_model(offline_cache, "org/tiny", tiny)
    make_model(tmp_path / "org" / "tiny", layers=1)  # a different model at the relative path org/tiny
    monkeypatch.chdir(tmp_path)
    assert resolve_model(Path("org/tiny")) == Path("org/tiny")
    r = invoke("eval", "--model", "org/tiny", *EVAL)
    assert r.exit_code == 0 and "Hub snapshot" not in r.output, r.output
    local = invoke("eval", "--model", tmp_path / "org" / "tiny", *EVAL)
    assert json.loads(r.stdout)["ppl"] == json.loads(local.stdout)["ppl"]
    r = invoke("eval", "--model", "org/tiny", "--revision", "main", *EVAL)
    assert r.exit_code == 2 and "--revision is for Hugging Face Hub ids; org/tiny is a local path" in r.output


@pytest.mark.slow
def test_an_id_missing_from_the_cache_offline_is_one_line(offline_cache, tmp_path):
    # a child process, so huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE from the environment
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(offline_cache))
    p = subprocess.run([sys.executable, "-m", "streamprune", "run", "--shards", "org/missing", "--out",
                        tmp_path / "out", "--calib", DEMO / "calib.txt"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (f"error: model folder not found: org/missing; as a Hugging Face Hub id it is not "
                        f"(completely) in the cache {offline_cache} and HF_HUB_OFFLINE is set\n")
    assert not (tmp_path / "out").exists()


def test_a_snapshot_missing_a_shard_is_refused_with_its_name(offline_cache, tiny):
    snapshot = cache_model(offline_cache, "org/tiny", tiny)
    shard = sorted(snapshot.glob("model-*.safetensors"))[1]
    shard.unlink()
    r = invoke("inspect", "--shards", "org/tiny")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert f"Hugging Face Hub model org/tiny (commit {COMMIT[:12]}) is missing {shard.name}" in r.output


REPO = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "LICENSE", "README.md", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        # never fetched: code, other weight formats, duplicate weights, extra folders
        "modeling_custom.py", "tokenization_custom.py", "pytorch_model.bin", "consolidated.safetensors",
        "model.gguf", "original/consolidated.00.pth", "original/params.json", "extra.safetensors", ".gitattributes"]
FETCHED = REPO[:11]


def test_only_the_files_a_run_reads_are_downloaded(tmp_path, monkeypatch):
    """snapshot_download replaced by a fake Hub repo (REPO) that keeps huggingface_hub's pattern
    matching: what the patterns let through is what would be downloaded."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    snapshot = tmp_path / "snapshots" / COMMIT
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append(revision)
        for name in filter_repo_objects(REPO, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
            (snapshot / name).write_text(json.dumps(index) if name.endswith("index.json") else "x")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("org/big") == snapshot
    fetched = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    assert fetched == sorted(FETCHED)
    assert calls == [None, COMMIT]  # the shards come from the commit the first call resolved
    assert "*.py" not in SMALL_FILES and not any(p.endswith((".bin", ".pt", ".gguf")) for p in SMALL_FILES)


def fake_hub(monkeypatch, repo: Path, snapshot: Path) -> list:
    """The Hub online, serving the model folder `repo`: snapshot_download copies the files its
    patterns allow into `snapshot` (and finds nothing with local_files_only), and
    get_safetensors_metadata reads the headers of `repo`'s shards. Returns the files fetched."""
    from types import SimpleNamespace as NS

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects
    fetched = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(sorted(p.name for p in repo.iterdir()), allow_patterns=allow_patterns):
            shutil.copyfile(repo / name, snapshot / name)
            fetched.append(name)
        return str(snapshot)

    def get_safetensors_metadata(repo_id, revision=None, **kwargs):
        files = {}
        for f in sorted(repo.glob("*.safetensors")):
            raw = f.read_bytes()
            header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
            header.pop("__metadata__", None)
            files[f.name] = NS(tensors={k: NS(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                                        for k, v in header.items()})
        return NS(files_metadata=files)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    return fetched


def test_inspect_and_plan_read_a_hub_model_from_its_headers(tiny, tmp_path, monkeypatch):
    fetched = fake_hub(monkeypatch, tiny, tmp_path / "snapshots" / COMMIT)
    remote = invoke("inspect", "--shards", "org/remote", "--json")
    assert remote.exit_code == 0, remote.output
    assert "org/remote: read from the Hugging Face Hub's safetensors headers (weights not downloaded)" in remote.output
    assert json.loads(remote.stdout) == json.loads(invoke("inspect", "--shards", tiny, "--json").stdout)
    plan = ["--sparsity", 0.3, "--samples", 4, "--seq-len", 32, "--max-memory", "4GiB", "--out", tmp_path / "out",
            "--no-timing", "--json"]
    remote = invoke("plan", "--shards", "org/remote", *plan)
    assert remote.exit_code == 0, remote.output
    local = json.loads(invoke("plan", "--shards", tiny, *plan).stdout)
    remote = json.loads(remote.stdout)
    same = ("micro_batch", "block_stored_bytes", "block_compute_bytes", "output_bytes", "cache_bytes", "breakdown",
            "peak_host_bytes", "verdict")
    assert {k: remote[k] for k in same} == {k: local[k] for k in same}
    weights = sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little")
                  for f in tiny.glob("*.safetensors"))
    parts = [p for d in remote["disk"] for p in d["parts"]]
    assert any(p.startswith("download into the Hub cache") for p in parts), parts
    assert sum(d["need_bytes"] for d in remote["disk"]) == sum(d["need_bytes"] for d in local["disk"]) + weights
    assert fetched and not any(name.endswith(".safetensors") for name in fetched)  # no weights downloaded
    r = invoke("plan", "--shards", "org/remote", *plan[:-2])
    assert r.exit_code == 0, r.output
    assert "download into the Hub cache" in r.output and "time: not measured here" in r.output
    assert "not measured: the weights are not downloaded" in r.output


@pytest.mark.parametrize("error,message", [
    ("RepositoryNotFoundError", "model folder not found: org/x, and no Hugging Face Hub model of that id "
                                "(or it is private: hf auth login)"),
    ("GatedRepoError", "Hugging Face Hub model org/x is gated: accept its terms on huggingface.co and log in"),
    ("RevisionNotFoundError", "Hugging Face Hub model org/x: no such revision"),
    ("HfHubHTTPError", "downloading Hugging Face Hub model org/x failed: server says no"),
])
def test_hub_failures_are_one_line(monkeypatch, error, message):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    def fail(*args, **kwargs):
        response = httpx2.Response(500, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
        raise getattr(errors, error)("server says no\nsecond line", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    r = invoke("inspect", "--shards", "org/x")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and message in r.output, r.output


def test_a_hub_model_without_safetensors_is_refused(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    fake_hub(monkeypatch, repo, tmp_path / "snapshots" / COMMIT)
    r = invoke("run", "--shards", "org/bin-only", "--out", tmp_path / "out", "--calib", DEMO / "calib.txt")
    assert r.exit_code == 2, r.output
    assert ("error: Hugging Face Hub model org/bin-only has no model.safetensors or model.safetensors.index.json: "
            "streamprune reads safetensors weights only (never pickled .bin files)") in r.output
    assert not (tmp_path / "snapshots" / COMMIT / "pytorch_model.bin").exists()


def test_run_checks_its_output_and_texts_before_downloading(tmp_path, monkeypatch):
    """A mistake in --out or --calib is refused before a Hub id's download starts."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before the checks")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    for args, message in ((["--out", str(foreign), "--calib", str(DEMO / "calib.txt")], "streamprune"),
                          (["--out", str(tmp_path / "out"), "--calib", str(tmp_path / "missing.txt")],
                           "text file not found")):
        r = invoke("run", "--shards", "org/big", *args)
        assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "out").exists()
