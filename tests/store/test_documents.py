"""documents.py: calibration and evaluation text from JSON lines, Parquet and `datasets`, joined
with a blank line. The comparison tests: a run or an evaluation on documents writes what the same
command writes on the plain text those documents join to. Parquet and datasets tests skip where
pyarrow / datasets are missing (the test extra installs them); datasets are built locally, offline."""

import gzip
import json
from pathlib import Path

import pytest

from streamprune.config import RunConfig
from streamprune.errors import StreamPruneError
from streamprune.store.documents import SEPARATOR, TextSource, parse_dataset
from tests.harness import invoke

DEMO = Path(__file__).resolve().parents[2] / "demo"
DOCS = ["First document.\nIt has two lines.", "", "Third, after an empty one: é ü"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (the data and test extras install it)")
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """datasets and huggingface_hub offline (both read the environment at import), datasets' cache in tmp_path."""
    datasets = pytest.importorskip("datasets", reason="needs datasets (the data and test extras)")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return datasets


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json.gz", "d.ndjson"])
def test_json_lines_are_joined_with_a_blank_line(tmp_path, name):
    path = write_jsonl(tmp_path / name, [{"text": d, "id": i} for i, d in enumerate(DOCS)] + [{"text": None}])
    assert TextSource(file=path).read() == SEPARATOR.join(DOCS) == "\n\n".join(DOCS)


def test_a_json_array_and_another_field(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"body": d} for d in DOCS] + [{"body": None}]))
    assert TextSource(file=tmp_path / "a.json", field="body").read() == SEPARATOR.join(DOCS)


def test_a_line_separator_inside_a_json_string_is_text(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one\u2028two"}\n{"text": "three"}\n', encoding="utf-8")  # raw U+2028
    assert TextSource(file=tmp_path / "d.jsonl").read() == "one\u2028two\n\nthree"


@pytest.mark.parametrize("rows,message", [
    ([{"text": "a"}, {"body": "b"}], r"d.jsonl line 2 has no field 'text' \(body\); choose it with --text-field"),
    ([{"text": "a"}, {"text": 3}], r"d.jsonl line 2: field 'text' is not text"),
    ([{"text": "a"}, ["text"]], r"d.jsonl line 2 has no field 'text' \(not an object\)"),
    ([{"text": " "}, {"text": ""}], r"no text in .*d.jsonl \(field text\)"),
])
def test_bad_json_lines_are_refused_with_where(tmp_path, rows, message):
    with pytest.raises(StreamPruneError, match=message):
        TextSource(file=write_jsonl(tmp_path / "d.jsonl", rows)).read()


def test_a_line_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(StreamPruneError, match=r"d.jsonl line 2 is not valid JSON \(one object per line\)"):
        TextSource(file=tmp_path / "d.jsonl").read()


def test_a_missing_or_plain_file_reads_as_before(tmp_path):
    with pytest.raises(StreamPruneError, match="text file not found"):
        TextSource(file=tmp_path / "nope.jsonl").read()
    (tmp_path / "t.txt").write_text("plain {\"text\": 1}")
    assert TextSource(file=tmp_path / "t.txt").read() == "plain {\"text\": 1}"


def test_parquet_reads_like_json_lines(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"text": DOCS + [None], "n": [1, 2, 3, 4]})
    assert TextSource(file=path).read() == SEPARATOR.join(DOCS)
    with pytest.raises(StreamPruneError, match=r"has no column 'body' \(text, n\); choose it with --text-field"):
        TextSource(file=path, field="body").read()
    with pytest.raises(StreamPruneError, match="column 'n' is not text"):
        TextSource(file=path, field="n").read()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(StreamPruneError, match="cannot read .*bad.parquet as Parquet"):
        TextSource(file=tmp_path / "bad.parquet").read()


@pytest.mark.parametrize("spec,parsed", [
    ("wikitext", ("wikitext", None, "train")), ("c4:validation", ("c4", None, "validation")),
    ("Salesforce/wikitext:wikitext-2-raw-v1:test", ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")),
    ("allenai/c4:en:train[:1000]", ("allenai/c4", "en", "train[:1000]")),
])
def test_dataset_names(spec, parsed):
    assert parse_dataset(spec) == parsed


@pytest.mark.parametrize("spec", ["", ":train", "a:b:c:d", "a::b"])
def test_bad_dataset_names(spec):
    with pytest.raises(StreamPruneError, match="expected NAME, NAME:SPLIT or NAME:CONFIG:SPLIT"):
        parse_dataset(spec)


def test_datasets_from_a_local_folder_and_from_save_to_disk(tmp_path, offline_datasets):
    datasets = offline_datasets
    (tmp_path / "local" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "local" / "data" / "train-00000-of-00001.parquet", {"text": DOCS})
    write_parquet(tmp_path / "local" / "data" / "test-00000-of-00001.parquet", {"text": ["held", "out"]})
    assert TextSource(dataset=str(tmp_path / "local")).read() == SEPARATOR.join(DOCS)
    assert TextSource(dataset=f"{tmp_path / 'local'}:test").read() == "held\n\nout"
    assert TextSource(dataset=f"{tmp_path / 'local'}:train[:1]").read() == DOCS[0]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": DOCS})}).save_to_disk(tmp_path / "saved")
    assert TextSource(dataset=f"{tmp_path / 'saved'}:validation", field="body").read() == SEPARATOR.join(DOCS)
    with pytest.raises(StreamPruneError, match=r"cannot load dataset org/not-cached:train: .*"):
        TextSource(dataset="org/not-cached:train").read()
    with pytest.raises(StreamPruneError, match=r"has no column 'body' \(text\)"):
        TextSource(dataset=str(tmp_path / "local"), field="body").read()


def test_the_fingerprint_covers_field_and_dataset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "body": "b"}])
    cfg = lambda **kw: RunConfig(shards=tmp_path, out=tmp_path / "o", **kw)  # noqa: E731
    assert cfg(calib=path).fingerprint() != cfg(calib=path, text_field="body").fingerprint()
    # a plain text file's fingerprint is what it always was (a journal from before still resumes)
    plain = cfg(calib=DEMO / "calib.txt").fingerprint()
    assert "text_field" not in plain and "calib_dataset" not in plain
    import hashlib
    assert plain["calib_sha256"] == hashlib.sha256((DEMO / "calib.txt").read_bytes()).hexdigest()


# a fast run (the text source is what is compared, not the method)
RUN = ["--shards", DEMO / "stories260K", "--samples", 4, "--seq-len", 64, "--method", "magnitude",
       "--allocation", "rule", "--quiet"]


def model_files(out: Path) -> dict:
    """The output's files; report.json without its arguments (the calibration source differs) and timing,
    and not the log (its times and paths differ)."""
    files = {f.name: f.read_bytes() for f in sorted(out.iterdir())
             if f.is_file() and f.name not in ("report.json", "streamprune.log")}
    report = json.loads((out / "report.json").read_text())
    for key in ("arguments", "timing"):
        report.pop(key)
    return dict(files, report=report)


def demo_documents(tmp_path: Path) -> list[str]:
    """The demo calibration text as documents: its blank-line separated stories."""
    return (DEMO / "calib.txt").read_text().split(SEPARATOR)


@pytest.mark.slow
def test_a_run_on_documents_writes_what_a_run_on_their_text_writes(tmp_path):
    jsonl = write_jsonl(tmp_path / "calib.jsonl", [{"text": d, "body": d.upper()} for d in demo_documents(tmp_path)])
    r = invoke("run", *RUN, "--out", tmp_path / "docs", "--calib", jsonl)
    assert r.exit_code == 0, r.output
    r = invoke("run", *RUN, "--out", tmp_path / "text", "--calib", DEMO / "calib.txt")
    assert r.exit_code == 0, r.output
    assert model_files(tmp_path / "docs") == model_files(tmp_path / "text")
    # another field of the same file is another calibration text: refused in that folder
    r = invoke("run", *RUN, "--out", tmp_path / "docs", "--calib", jsonl, "--text-field", "body")
    assert r.exit_code == 2 and "different arguments" in r.output, r.output


@pytest.mark.slow
def test_eval_on_documents_and_datasets_equals_eval_on_their_text(tmp_path, offline_datasets):
    docs = demo_documents(tmp_path)[:200]
    (tmp_path / "joined.txt").write_text(SEPARATOR.join(docs))
    write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    (tmp_path / "ds" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "ds" / "data" / "test-00000-of-00001.parquet", {"content": docs})
    common = ["eval", "--model", DEMO / "stories260K", "--seq-len", 128, "--max-windows", 4, "--json", "--quiet"]
    results = [invoke(*common, *source) for source in (
        ["--text", tmp_path / "joined.txt"], ["--text", tmp_path / "d.jsonl"],
        ["--text-dataset", f"{tmp_path / 'ds'}:test", "--text-field", "content"])]
    assert all(r.exit_code == 0 for r in results), [r.output for r in results]
    ppl = {json.loads(r.stdout)["ppl"] for r in results}
    assert len(ppl) == 1
    assert json.loads(results[2].stdout)["text"] == f"dataset {tmp_path / 'ds'}:test (field content)"
    r = invoke(*common)
    assert r.exit_code == 2 and "give --text FILE or --text-dataset NAME (one of them)" in r.output


@pytest.mark.slow
def test_run_takes_datasets_and_refuses_two_sources(tmp_path, offline_datasets):
    """--calib-dataset and --eval-dataset; the perplexities in report.json are those `eval` measures
    on the joined text, before (the input) and after (the output)."""
    docs = demo_documents(tmp_path)
    (tmp_path / "ds" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet", {"text": docs})
    write_parquet(tmp_path / "ds" / "data" / "test-00000-of-00001.parquet", {"text": docs[:100]})
    (tmp_path / "held-out.txt").write_text(SEPARATOR.join(docs[:100]))
    r = invoke("run", *RUN, "--out", tmp_path / "o", "--calib-dataset", tmp_path / "ds",
               "--eval-dataset", f"{tmp_path / 'ds'}:test", "--eval-seq-len", 64)
    assert r.exit_code == 0, r.output
    assert f"perplexity on dataset {tmp_path / 'ds'}:test (field text) over " in r.output
    assert " windows of 64 tokens: " in r.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["arguments"]["calib_dataset"] == str(tmp_path / "ds")
    for folder, key in ((DEMO / "stories260K", "ppl_before"), (tmp_path / "o", "ppl_after")):
        e = invoke("eval", "--model", folder, "--text", tmp_path / "held-out.txt", "--seq-len", 64, "--json", "--quiet")
        assert json.loads(e.stdout)["ppl"] == report["eval"][key]
    for two in (["--calib-dataset", tmp_path / "ds", "--calib", DEMO / "calib.txt"],
                ["--calib", DEMO / "calib.txt", "--eval", DEMO / "eval.txt", "--eval-dataset", tmp_path / "ds"]):
        r = invoke("run", *RUN, "--out", tmp_path / "o2", *two)
        assert r.exit_code == 2 and "not both" in r.output, r.output
        assert not (tmp_path / "o2").exists()


def test_without_the_data_packages_the_message_says_what_to_install(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(StreamPruneError, match=r"reading d.parquet needs pyarrow: pip install 'streamprune\[data\]'"):
        TextSource(file=tmp_path / "d.parquet").read()
    with pytest.raises(StreamPruneError, match=r"reading a dataset needs the datasets package: pip install"):
        TextSource(dataset="wikitext:test").read()
