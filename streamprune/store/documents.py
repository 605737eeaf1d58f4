"""Where calibration and evaluation text comes from: a plain text file, a file of documents (JSON
lines or Parquet, one text field per row), or a `datasets` dataset. Documents are joined with a
blank line ("\\n\\n", as the usual WikiText-2 perplexity recipe joins its rows), in file order,
so the same source always gives the same text; windows are then cut from it as from a plain file.

JSON lines: `.jsonl`, `.ndjson`, `.json` (one object per line, or one array of objects), each
optionally gzipped (`.gz`, as C4's files are). Parquet needs pyarrow, a dataset needs `datasets`
(both in the `streamprune[data]` extra). Anything else is plain UTF-8 text."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import StreamPruneError
from .input_files import is_input_file, open_input

SEPARATOR = "\n\n"
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_EXTRA = "pip install 'streamprune[data]'"


@dataclass(frozen=True)
class TextSource:
    """A text file (`file`) or a dataset (`dataset`, NAME[:CONFIG][:SPLIT]); `field` names the
    text of each row of a JSON lines or Parquet file or a dataset."""

    file: Path | None = None
    dataset: str | None = None
    field: str = "text"

    def __post_init__(self):
        if (self.file is None) == (self.dataset is None):
            raise StreamPruneError("a text source is a file or a dataset, not both or neither")
        if not self.field:
            raise StreamPruneError("--text-field must not be empty")

    @property
    def kind(self) -> str:
        """"text", "json", "parquet" or "dataset"."""
        if self.dataset is not None:
            return "dataset"
        name = Path(self.file).name.lower().removesuffix(".gz")
        return "json" if name.endswith(JSON_SUFFIXES) else "parquet" if name.endswith(PARQUET_SUFFIXES) else "text"

    def describe(self) -> str:
        """How it is named in messages and reports: the file, or `dataset NAME (field F)`."""
        if self.kind == "text":
            return str(self.file)
        return f"{'dataset ' + self.dataset if self.dataset else self.file} (field {self.field})"

    def read(self) -> str:
        """The whole text (documents joined with a blank line); refused when blank."""
        return read_source(self)

    def sha256(self) -> str:
        """What a resumed run checks has not changed: a plain file's bytes (as always); a file of
        documents' bytes and the field; a dataset's name, field and text."""
        if self.kind == "text":
            return file_sha256(self.file)
        if self.kind == "dataset":
            return hashlib.sha256(f"dataset:{self.dataset}\0field:{self.field}\0{self.read()}".encode()).hexdigest()
        return hashlib.sha256(f"{file_sha256(self.file)}\0field:{self.field}".encode()).hexdigest()


def as_source(text) -> TextSource:
    """A path (the historic argument) or a TextSource, as a TextSource."""
    return text if isinstance(text, TextSource) else TextSource(file=Path(text))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_input(Path(path)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_source(source: TextSource) -> str:
    if source.kind == "dataset":
        text = dataset_text(source.dataset, source.field)
    elif not is_input_file(source.file):
        raise StreamPruneError(f"text file not found: {source.file}")
    elif source.kind == "json":
        text = SEPARATOR.join(json_documents(Path(source.file), source.field))
    elif source.kind == "parquet":
        text = SEPARATOR.join(parquet_documents(Path(source.file), source.field))
    else:
        text = plain_text(source.file)
    if not text.strip():
        raise StreamPruneError(f"text file is empty: {source.file}" if source.kind == "text"
                               else f"no text in {source.describe()}")
    return text


def plain_text(path: Path) -> str:
    with io.TextIOWrapper(open_input(path), encoding="utf-8", errors="replace") as f:  # as Path.read_text
        return f.read()


def json_documents(path: Path, field: str) -> list[str]:
    """The `field` of every object: one per line, or one JSON array of objects."""
    raw = open_input(path)
    with raw, (gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw) as f:
        try:
            data = f.read().decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise StreamPruneError(f"cannot read {path}: {e}") from None
    if data.lstrip().startswith("["):
        try:
            rows = json.loads(data)
        except ValueError as e:
            raise StreamPruneError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise StreamPruneError(f"{path} is not a JSON array of objects")
        documents = [row_text(row, field, f"{path} item {i + 1}") for i, row in enumerate(rows)]
        return [d for d in documents if d is not None]
    documents = []
    for i, line in enumerate(data.split("\n")):  # not splitlines: U+2028 may stand unescaped in a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise StreamPruneError(f"{path} line {i + 1} is not valid JSON (one object per line)") from None
        documents.append(row_text(row, field, f"{path} line {i + 1}"))
    return [d for d in documents if d is not None]


def row_text(row, field: str, where: str) -> str | None:
    """The row's text (None for a null one, which is skipped)."""
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(list(row)[:8]) if isinstance(row, dict) else "not an object"
        raise StreamPruneError(f"{where} has no field {field!r} ({keys}); choose it with --text-field")
    value = row[field]
    if value is not None and not isinstance(value, str):
        raise StreamPruneError(f"{where}: field {field!r} is not text")
    return value


def parquet_documents(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise StreamPruneError(f"reading {path.name} needs pyarrow: {DATA_EXTRA}") from None
    with open_input(path) as f:
        try:
            schema = pq.read_schema(f)
            if field not in schema.names:
                raise StreamPruneError(f"{path} has no column {field!r} ({', '.join(schema.names[:8])}); "
                                       "choose it with --text-field")
            f.seek(0)
            column = pq.read_table(f, columns=[field]).column(field)
        except StreamPruneError:
            raise
        except Exception as e:  # pyarrow's many error types for a damaged file
            raise StreamPruneError(f"cannot read {path} as Parquet: {str(e).splitlines()[0][:200]}") from None
    return text_column(column.to_pylist(), field, str(path))


def text_column(values: list, field: str, where: str) -> list[str]:
    if any(v is not None and not isinstance(v, str) for v in values):
        raise StreamPruneError(f"{where}: column {field!r} is not text")
    return [v for v in values if v is not None]


SPEC_PART = re.compile(r":(?![^\[]*\])")  # a colon outside a split's slice, as in train[:1000]


def parse_dataset(spec: str) -> tuple[str, str | None, str]:
    """NAME[:CONFIG][:SPLIT] -> (name, config or None, split; default train). A split may be a
    slice: `wikitext:wikitext-2-raw-v1:train[:2000]`."""
    parts = SPEC_PART.split(spec)
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise StreamPruneError(f"dataset {spec!r}: expected NAME, NAME:SPLIT or NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


@functools.lru_cache(maxsize=2)  # the fingerprint and the windows read a dataset once, not twice
def dataset_text(spec: str, field: str) -> str:
    return SEPARATOR.join(dataset_documents(spec, field))


def dataset_documents(spec: str, field: str) -> list[str]:
    """The `field` column of a dataset split: a folder written by save_to_disk, or whatever
    datasets.load_dataset finds (a local data folder, or a Hub dataset: from its cache, and with
    HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1 only from there). Datasets no longer run code."""
    try:
        import datasets
    except ImportError:
        raise StreamPruneError(f"reading a dataset needs the datasets package: {DATA_EXTRA}") from None
    name, config, split = parse_dataset(spec)
    datasets.disable_progress_bars()
    try:
        if (Path(name) / "dataset_info.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types: not found, offline, bad split, bad config
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise StreamPruneError(f"cannot load dataset {spec}: {detail}") from None
    if field not in ds.column_names:
        raise StreamPruneError(f"dataset {spec} has no column {field!r} ({', '.join(ds.column_names[:8])}); "
                               "choose it with --text-field")
    return text_column(ds[field], field, f"dataset {spec}")
