"""Calibration tokens: tokenize a text (a file, or documents: documents.py) with the model's
tokenizer and cut it into windows; gather the embedding rows those tokens need (and no others)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .documents import as_source
from .errors import StreamPruneError
from .families import EMBED
from .shards import check_folder_files

log = logging.getLogger(__name__)


def load_tokenizer(folder: Path):
    """The model's tokenizer, built from transformers' own classes only: code shipped with a model
    (auto_map) is never run, and nothing is asked on the terminal."""
    from transformers import AutoTokenizer
    check_folder_files(folder)  # a FIFO or a device among the tokenizer files would block or never end
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a missing/bad tokenizer
        if "trust_remote_code" in str(e):
            raise StreamPruneError(f"the tokenizer in {folder} needs code shipped with the model (auto_map); "
                                   "streamprune never runs a model's code") from None
        raise StreamPruneError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0][:200]}") from None


def bos_id(tokenizer) -> int | None:
    """The BOS id if this tokenizer puts one in front of every text (Llama does, Qwen does not)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None


def read_text(text) -> str:
    """A calibration or evaluation text (a path or a documents.TextSource): a plain text file (a
    regular file, never a FIFO or a device), or the documents of a JSON lines or Parquet file or a
    dataset joined with blank lines; never blank."""
    return as_source(text).read()


def tokenize_file(tokenizer, text, special_tokens: bool = False) -> list[int]:
    """The whole text (a path or a TextSource) as one token stream; with the tokenizer's default
    special tokens (a Llama BOS at the very start: evaluation) or without (calibration windows get
    their own BOS)."""
    return tokenizer(read_text(text), add_special_tokens=special_tokens, verbose=False).input_ids


def token_windows(ids: list[int], n: int, seq_len: int, bos: int | None) -> torch.Tensor:
    """n windows of seq_len tokens, spread evenly over the text and never overlapping; each starts
    with BOS when the tokenizer uses one. Returns (n, seq_len) int64."""
    body = seq_len - (bos is not None)
    if len(ids) < n * body:
        raise StreamPruneError(
            f"calibration text has {len(ids)} tokens; --samples {n} x --seq-len {seq_len} needs {n * body}: "
            "use a longer text, fewer --samples or a shorter --seq-len")
    stride = (len(ids) - body) // max(n - 1, 1)
    rows = [ids[i * stride:i * stride + body] for i in range(n)]
    if bos is not None:
        rows = [[bos] + r for r in rows]
    return torch.tensor(rows, dtype=torch.int64)


def gather_embeddings(index, name: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding rows of the distinct tokens, and each token's position among them:
    rows[where] is the embedding of `tokens`."""
    distinct, where = torch.unique(tokens, return_inverse=True)
    check_token_ids(distinct, index.tensors[name].shape[0], name)
    return index.rows(name, distinct), where


def check_token_ids(distinct: torch.Tensor, rows: int, name: str) -> None:
    """Every token id (sorted, unique) has a row in the embedding: a tokenizer with a larger
    vocabulary than the model's would otherwise fail deep in the run."""
    if len(distinct) and (distinct[0] < 0 or distinct[-1] >= rows):
        bad = int(distinct[-1] if distinct[-1] >= rows else distinct[0])
        raise StreamPruneError(f"the tokenizer produced token id {bad}, but {name} has {rows} rows "
                               "(vocab_size); the tokenizer does not belong to this model")


def check_tokens_fit(index, tokens: torch.Tensor) -> None:
    """The windows' token ids all have an embedding row (checked before anything is written)."""
    check_token_ids(torch.unique(tokens), index.tensors[EMBED].shape[0], EMBED)


def write_embeddings(cache, index, tokens: torch.Tensor, batch: int) -> None:
    """Block 0's inputs: the embeddings of the windows `tokens` (n, T), into the activation cache a
    micro-batch at a time (only the embedding rows of the tokens used are read)."""
    rows, where = gather_embeddings(index, EMBED, tokens)
    writer = cache.writer(0)
    for start in range(0, tokens.shape[0], batch):
        writer.write(start, rows[where[start:start + batch]].float())
    writer.commit()
