"""calibration.py: windows are evenly spread, never overlap and start with BOS when the tokenizer
uses one; a file tokenizes as the tokenizer does it; block 0's inputs are exactly the embedding
rows of the tokens, read for the distinct tokens only."""

from pathlib import Path

import pytest
import torch

from streamprune.arch.spec import EMBED
from streamprune.errors import StreamPruneError
from streamprune.inputs.calibration import (
    bos_id,
    check_window,
    default_window,
    fit_windows,
    gather_embeddings,
    load_tokenizer,
    token_windows,
    tokenize_file,
    write_embeddings,
)
from streamprune.store.cache import ActivationCache
from streamprune.store.shard_writer import OutTensor, write_safetensors
from streamprune.store.shards import ShardIndex

DEMO = Path(__file__).resolve().parents[2] / "demo"
VOCAB, HIDDEN = 20, 4


def starts(windows: torch.Tensor, bos) -> list[int]:
    """Where each window's body begins in the text (token i of these texts is i)."""
    return windows[:, 1 if bos is not None else 0].tolist()


@pytest.mark.parametrize("length,n,seq_len,bos", [(100, 4, 10, None), (100, 4, 10, 999), (40, 4, 10, None),
                                                  (37, 4, 10, 999), (50, 1, 8, None), (101, 7, 3, 999)])
def test_windows_are_spread_evenly_and_never_overlap(length, n, seq_len, bos):
    ids = list(range(length))
    w = token_windows(ids, n, seq_len, bos)
    assert w.shape == (n, seq_len) and w.dtype == torch.int64
    body = seq_len - (bos is not None)
    if bos is not None:
        assert (w[:, 0] == bos).all()
    s = starts(w, bos)
    for row, start in zip(w[:, seq_len - body:].tolist(), s):
        assert row == ids[start:start + body]  # a contiguous piece of the text
    assert s[0] == 0 and s[-1] + body <= length
    gaps = [b - a for a, b in zip(s, s[1:])]
    assert len(set(gaps)) <= 1 and all(g >= body for g in gaps)  # same spacing, no overlap
    if n > 1:
        assert length - (s[-1] + body) < n - 1  # spread over the whole text: what is left after the last is rounding


def test_too_short_a_text_is_refused_with_what_it_needs():
    with pytest.raises(StreamPruneError, match=r"calibration text has 39 tokens; --samples 4 x --seq-len 10 needs 40"):
        token_windows(list(range(39)), 4, 10, None)
    with pytest.raises(StreamPruneError, match=r"has 35 tokens; --samples 4 x --seq-len 10 needs 36: it holds "
                                               r"--samples 3 at --seq-len 10, or --seq-len 9 at --samples 4; or use"):
        token_windows(list(range(35)), 4, 10, 1)  # the BOS is not taken from the text


def test_options_the_user_set_are_refused_with_what_the_text_holds():
    """The shipped KJV calibration text (48,700 tokens here) and the defaults 128 x 2048."""
    with pytest.raises(StreamPruneError, match=r"has 48,700 tokens; --samples 128 x --seq-len 2048 needs 262,016: it "
                                               r"holds --samples 23 at --seq-len 2048, or --samples 190 at --seq-len "
                                               r"256; or use a longer text"):
        fit_windows(48_700, 128, 2048, True)
    assert fit_windows(48_700, 23, 2048, True) == (23, 2048)  # what the message offers does fit


@pytest.mark.parametrize("n_tokens,adaptable,expected", [
    (48_700, ("samples", "seq_len"), (23, 2048)),  # as many windows as the text holds
    (10_000, ("samples", "seq_len"), (8, 1251)),  # fewer than 8: 8 shorter windows (with their BOS)
    (10_000, ("samples",), (4, 2048)),  # --seq-len set: as many of those as the text holds
    (48_700, ("seq_len",), (128, 381)),  # --samples set: windows as long as the text allows
    (300_000, ("samples", "seq_len"), (128, 2048)),  # a long enough text: the defaults
])
def test_defaults_adapt_to_a_short_text(n_tokens, adaptable, expected):
    samples, seq_len = fit_windows(n_tokens, 128, 2048, True, adaptable)
    assert (samples, seq_len) == expected
    assert samples * (seq_len - 1) <= n_tokens
    token_windows(list(range(n_tokens)), samples, seq_len, 1)  # the windows are cut without a complaint


def test_defaults_do_not_adapt_below_the_shortest_window():
    with pytest.raises(StreamPruneError, match="calibration text has 200 tokens"):
        fit_windows(200, 128, 2048, True, ("samples", "seq_len"))  # 8 windows would have 25 tokens


def test_one_default_window_for_calibration_and_evaluation():
    assert default_window({"max_position_embeddings": 512}) == 512
    assert default_window({"max_position_embeddings": 8192}) == default_window({}) == 2048
    check_window({"max_position_embeddings": 512}, 512)
    with pytest.raises(StreamPruneError, match="--seq-len 513 exceeds max_position_embeddings 512; use at most 512"):
        check_window({"max_position_embeddings": 512}, 513)


def test_tokenize_file_with_and_without_special_tokens(tmp_path):
    tok = load_tokenizer(DEMO / "stories260K")
    text = "Once upon a time, there was a little dog.\nIt liked to run."
    (tmp_path / "t.txt").write_text(text)
    plain = tokenize_file(tok, tmp_path / "t.txt")
    assert plain == tok(text, add_special_tokens=False).input_ids and tok.bos_token_id not in plain
    assert tokenize_file(tok, tmp_path / "t.txt", special_tokens=True) == [tok.bos_token_id] + plain
    assert bos_id(tok) == tok.bos_token_id == 1  # a Llama tokenizer: windows get their own BOS
    (tmp_path / "blank.txt").write_text(" \n\t")
    with pytest.raises(StreamPruneError, match="text file is empty"):
        tokenize_file(tok, tmp_path / "blank.txt")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16])
def embedding(request, tmp_path_factory):
    """A one-file model folder holding an embedding only, and the embedding."""
    folder = tmp_path_factory.mktemp("emb")
    emb = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0)).to(request.param)
    write_safetensors(folder / "model.safetensors", [OutTensor.of(EMBED, emb)])
    return ShardIndex.open(folder), emb


TOKENS = torch.tensor([[3, 3, 7, 0, 19], [8, 7, 9, 10, 3], [19, 0, 1, 2, 3]])


def test_gather_embeddings_reads_the_distinct_rows(embedding):
    index, emb = embedding
    rows, where = gather_embeddings(index, EMBED, TOKENS)
    assert rows.shape == (len(TOKENS.unique()), HIDDEN) and rows.dtype == emb.dtype  # no other rows read
    assert where.shape == TOKENS.shape
    assert torch.equal(rows[where], emb[TOKENS])


def test_a_token_past_the_embedding_is_refused(embedding):
    index, _ = embedding
    with pytest.raises(StreamPruneError, match=f"token id {VOCAB}, but {EMBED} has {VOCAB} rows"):
        gather_embeddings(index, EMBED, torch.tensor([[1, VOCAB]]))


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_write_embeddings_puts_the_lookup_into_the_cache(embedding, tmp_path, batch):
    index, emb = embedding
    cache = ActivationCache(tmp_path, *TOKENS.shape, HIDDEN)
    write_embeddings(cache, index, TOKENS, batch)
    assert cache.has(0)
    assert torch.equal(cache.batch(0, 0, len(TOKENS)), emb[TOKENS].float())


def test_a_tokenizer_without_its_vocabulary_is_named(tmp_path):
    """tokenizer_config.json kept, tokenizer.json gone: transformers builds an empty tokenizer."""
    import shutil

    from streamprune.errors import StreamPruneError
    from streamprune.inputs.calibration import load_tokenizer
    folder = tmp_path / "m"
    shutil.copytree(Path(__file__).resolve().parents[2] / "demo" / "stories260K", folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(StreamPruneError, match=r"the tokenizer in .* is incomplete: it turns text into no tokens "
                                               r"\(tokenizer files there: tokenizer_config.json; tokenizer.json or "
                                               r"tokenizer.model is missing\)"):
        load_tokenizer(folder)


def test_a_text_too_short_for_any_window_says_so_plainly():
    from streamprune.errors import StreamPruneError
    from streamprune.inputs.calibration import fit_windows
    with pytest.raises(StreamPruneError) as e:
        fit_windows(0, 128, 512, True)
    assert str(e.value) == ("calibration text has 0 tokens; --samples 128 x --seq-len 512 needs 65,408: "
                            "use a longer text")
