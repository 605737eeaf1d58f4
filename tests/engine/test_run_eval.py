"""run --eval's bookkeeping (engine/run_eval.py): the key a measurement is journaled under (the
held-out text's sha256 and the window) and the journaled measurement reused when it matches."""

import hashlib
import json

import pytest

from streamprune.config import RunConfig
from streamprune.engine import run_eval
from streamprune.errors import StreamPruneError
from streamprune.store.journal import Journal
from tests.models import tiny_config


@pytest.fixture
def shards(tmp_path):
    tiny_config("llama", max_position_embeddings=512).save_pretrained(tmp_path / "in")
    return tmp_path / "in"


def cfg(shards, tmp_path, **kw):
    return RunConfig(shards=shards, out=tmp_path / "out", progress=False, **kw)


def test_key_is_the_texts_sha256_and_the_window(shards, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("Once upon a time there was a tiny model.\n")
    sha = hashlib.sha256(text.read_bytes()).hexdigest()
    assert run_eval.eval_text_key(cfg(shards, tmp_path, eval=text)) == (sha, 512)  # 2048, at most max positions
    assert run_eval.eval_text_key(cfg(shards, tmp_path, eval=text, eval_seq_len=64)) == (sha, 64)
    with pytest.raises(StreamPruneError, match="--eval-seq-len 600 exceeds max_position_embeddings 512"):
        run_eval.eval_text_key(cfg(shards, tmp_path, eval=text, eval_seq_len=600))
    text.write_text("Another text.\n")
    assert run_eval.eval_text_key(cfg(shards, tmp_path, eval=text))[0] != sha


def test_key_of_documents_covers_the_field_and_a_missing_file_has_no_sha(shards, tmp_path):
    docs = tmp_path / "heldout.jsonl"
    docs.write_text(json.dumps({"text": "a story", "body": "another"}) + "\n")
    by_text = run_eval.eval_text_key(cfg(shards, tmp_path, eval=docs))[0]
    by_body = run_eval.eval_text_key(cfg(shards, tmp_path, eval=docs, text_field="body"))[0]
    assert by_text != by_body and by_text != hashlib.sha256(docs.read_bytes()).hexdigest()
    assert run_eval.eval_text_key(cfg(shards, tmp_path, eval=tmp_path / "missing.txt", eval_seq_len=32)) == (None, 32)


def held(sha, seq_len):
    return {"text_sha256": sha, "seq_len": seq_len, "ppl": 12.5, "nll": 2.5, "windows": 3, "tokens": 93,
            "seconds": 1.0}


def test_a_journaled_measurement_on_the_same_text_and_window_is_reused(shards, tmp_path, monkeypatch):
    text = tmp_path / "heldout.txt"
    text.write_text("Once upon a time.\n")
    c = cfg(shards, tmp_path, eval=text, eval_seq_len=32)
    sha, _ = run_eval.eval_text_key(c)
    measured = []

    class Result:
        def as_dict(self):
            return held(sha, 32) | {"ppl": 9.0}

    def perplexity(folder, source, seq_len, *args, **kw):
        measured.append((folder, seq_len))
        return Result()

    monkeypatch.setattr(run_eval, "perplexity", perplexity)
    journal = Journal.copy({"blocks": {}, "eval": {"before": held(sha, 32)}})
    assert run_eval.journaled_eval(c, journal, "before", shards, tmp_path) == held(sha, 32)
    assert measured == []
    # another window: measured again, and journaled
    journal = Journal.copy({"blocks": {}, "eval": {"before": held(sha, 64)}})
    assert run_eval.journaled_eval(c, journal, "before", shards, tmp_path)["ppl"] == 9.0
    assert measured == [(shards, 32)] and journal.eval_result("before")["ppl"] == 9.0
