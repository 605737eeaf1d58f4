"""The tokenizer conversion on its own (no model): what goes into the GGUF file's tokenizer fields
for SentencePiece-style tokenizers (the space in front of the text, from a Prepend normalizer or
Metaspace's prepend_scheme, as transformers runs the tokenizer), the BOS id whenever the tokenizer
adds one, and the refusals of normalizers llama.cpp does not apply."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from streamprune.errors import StreamPruneError
from streamprune.output.gguf_vocab import read_vocab
from tests.models import TINYSTORIES

DEMO = TINYSTORIES / "stories260K"  # SentencePiece-style BPE: Metaspace, prepend_scheme "first", BOS <s> (id 1)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PREPEND = {"type": "Prepend", "prepend": "\u2581"}
SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}


def generic(config: dict) -> None:
    """transformers' generic tokenizer class runs tokenizer.json as written (LlamaTokenizer sets the
    pre-tokenizer from its own options)."""
    config["tokenizer_class"] = "TokenizersBackend"


def tokenizer(folder: Path, edit=None, config_edit=generic) -> Path:
    """The demo's tokenizer files in `folder`, tokenizer.json changed by `edit(dict)` and
    tokenizer_config.json by `config_edit(dict)` (default: the generic class)."""
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, folder / name)
    for name, change in (("tokenizer.json", edit), ("tokenizer_config.json", config_edit)):
        if change:
            data = json.loads((folder / name).read_text())
            change(data)
            (folder / name).write_text(json.dumps(data))
    return folder


def vocab(folder: Path):
    return read_vocab(folder, 512)


def test_the_demo_tokenizer():
    v = vocab(DEMO)
    assert (v.model, v.add_space_prefix, v.add_bos, v.add_eos) == ("llama", True, True, False)
    assert v.special["bos"] == 1 and v.tokens[1] == "<s>"


@pytest.mark.parametrize("scheme, prefix", [("first", True), ("always", True), ("never", False)])
def test_metaspace_prepend_scheme(tmp_path, scheme, prefix):
    folder = tokenizer(tmp_path / "t", lambda t: t["pre_tokenizer"].update(prepend_scheme=scheme))
    assert vocab(folder).add_space_prefix is prefix


@pytest.mark.parametrize("steps, prefix", [([PREPEND, SPACES], True), ([SPACES], False)])
def test_sentencepiece_normalizer_sequence(tmp_path, steps, prefix):
    """Llama 2's own tokenizer.json: no pre-tokenizer, spaces made '▁' (and one put in front) by the normalizer."""
    def normalizer(t):
        t["pre_tokenizer"] = None
        t["normalizer"] = {"type": "Sequence", "normalizers": steps}
    assert vocab(tokenizer(tmp_path / "t", normalizer)).add_space_prefix is prefix


@pytest.mark.parametrize("steps", [[{"type": "NFKC"}, PREPEND, SPACES], [{"type": "Lowercase"}],
                                   [PREPEND, {"type": "Replace", "pattern": {"String": "\t"}, "content": " "}]])
def test_a_normalizer_that_is_not_sentencepieces_is_refused(tmp_path, steps):
    folder = tokenizer(tmp_path / "t", lambda t: t.update(normalizer={"type": "Sequence", "normalizers": steps}))
    with pytest.raises(StreamPruneError, match="is not SentencePiece's, and llama.cpp applies none"):
        vocab(folder)


def test_byte_fallback_without_sentencepiece_spaces_is_refused(tmp_path):
    folder = tokenizer(tmp_path / "t", lambda t: t.update(pre_tokenizer=None, normalizer=None))
    with pytest.raises(StreamPruneError, match="without SentencePiece's '▁' spaces"):
        vocab(folder)


def test_what_transformers_runs_wins_over_the_file(tmp_path):
    """LlamaTokenizer (the demo's class) puts '▁' in front whatever tokenizer.json's prepend_scheme says,
    unless tokenizer_config.json's add_prefix_space is false."""
    never = lambda t: t["pre_tokenizer"].update(prepend_scheme="never")  # noqa: E731
    assert vocab(tokenizer(tmp_path / "llama", never, config_edit=None)).add_space_prefix is True
    off = tokenizer(tmp_path / "off", config_edit=lambda c: c.update(add_prefix_space=False))
    assert vocab(off).add_space_prefix is False


def test_the_bos_id_is_the_one_the_tokenizer_adds(tmp_path):
    """tokenizer_config.json names no bos_token, tokenizer.json's post-processor adds <s>: the id
    goes in with add_bos (llama.cpp's default BOS id would otherwise be used)."""
    folder = tokenizer(tmp_path / "t", config_edit=lambda c: (c.pop("bos_token"), generic(c)))
    v = vocab(folder)
    assert v.add_bos and v.special["bos"] == 1


def test_a_tokenizer_that_adds_no_bos(tmp_path):
    def no_bos(t):
        t["post_processor"]["single"] = t["post_processor"]["single"][1:]
    v = vocab(tokenizer(tmp_path / "t", no_bos))
    assert not v.add_bos and not v.add_eos
