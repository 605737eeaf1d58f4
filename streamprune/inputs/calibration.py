"""Calibration tokens: tokenize a text (a file, or documents: documents.py) with the model's
tokenizer and cut it into windows; gather the embedding rows those tokens need (and no others)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..arch.spec import EMBED
from ..errors import StreamPruneError
from ..store.documents import as_source
from ..store.input_files import check_folder_files

log = logging.getLogger(__name__)


def load_tokenizer(folder: Path):
    """The model's tokenizer, built from transformers' own classes only: code shipped with a model
    (auto_map) is never run, and nothing is asked on the terminal."""
    from transformers import AutoTokenizer
    check_folder_files(folder)  # a FIFO or a device among the tokenizer files would block or never end
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a missing/bad tokenizer
        if "trust_remote_code" in str(e):
            raise StreamPruneError(f"the tokenizer in {folder} needs code shipped with the model (auto_map); "
                                   "streamprune never runs a model's code") from None
        raise StreamPruneError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0][:200]}") from None
    if not tokenizer("streamprune", add_special_tokens=False).input_ids:
        # transformers builds an empty tokenizer from tokenizer_config.json alone
        present = [p.name for p in sorted(Path(folder).glob("tokenizer*"))] or ["none"]
        raise StreamPruneError(f"the tokenizer in {folder} is incomplete: it turns text into no tokens (tokenizer "
                               f"files there: {', '.join(present)}; tokenizer.json or tokenizer.model is missing)")
    return tokenizer


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


DEFAULT_WINDOW = 2048  # tokens per window, calibration and evaluation, unless the model allows fewer
FEWEST_WINDOWS = 8  # adapted defaults: fewer windows than this and the windows get shorter instead
SHORTEST_WINDOW = 32  # ... but never shorter than this


def max_window(config: dict) -> int:
    """The longest window the model was built for (max_position_embeddings; 2048 when unstated)."""
    return config.get("max_position_embeddings") or DEFAULT_WINDOW


def default_window(config: dict) -> int:
    """The one default window of calibration and evaluation: 2048 tokens, at most max positions."""
    return min(DEFAULT_WINDOW, max_window(config))


def check_window(config: dict, seq_len: int, option: str = "--seq-len") -> None:
    """A window the user asked for may not run past the positions the model was trained on."""
    if seq_len > max_window(config):
        raise StreamPruneError(f"{option} {seq_len} exceeds max_position_embeddings {max_window(config)}; "
                               f"use at most {max_window(config)}")


def run_window(config: dict, seq_len: int, adaptable: tuple[str, ...] = ()) -> int:
    """The window a run uses: --seq-len left at its default is capped at max positions, one the
    user set is refused beyond them (run and plan alike)."""
    if "seq_len" in adaptable:
        return min(seq_len, max_window(config))
    check_window(config, seq_len)
    return seq_len


def supported_windows(n_tokens: int, samples: int, seq_len: int, bos: bool) -> str:
    """What a text of n_tokens can give, in options: '--samples 23 at --seq-len 2048, or ...'."""
    options = []
    if n_tokens // (seq_len - bos) >= 1:
        options.append(f"--samples {n_tokens // (seq_len - bos)} at --seq-len {seq_len}")
    if seq_len > 256 and n_tokens // (256 - bos) >= 1:
        options.append(f"--samples {n_tokens // (256 - bos)} at --seq-len 256")
    if n_tokens // samples + bos >= 2:
        options.append(f"--seq-len {n_tokens // samples + bos} at --samples {samples}")
    return ", or ".join(options[:2]) if options else "use a longer text"


def fit_windows(n_tokens: int, samples: int, seq_len: int, bos: bool, adaptable: tuple[str, ...] = ()) \
        -> tuple[int, int]:
    """(samples, seq_len) that a text of n_tokens holds (each window takes seq_len - bos tokens of
    the text). Options left at their defaults (`adaptable`: "samples", "seq_len") shrink when the
    text is short: as many windows as it holds, and with fewer than FEWEST_WINDOWS, shorter windows
    (never below SHORTEST_WINDOW tokens); options the user set are kept or refused, with what
    the text supports."""
    if n_tokens >= samples * (seq_len - bos):
        return samples, seq_len
    if "samples" in adaptable:
        fit = n_tokens // (seq_len - bos)
        if fit >= FEWEST_WINDOWS or (fit >= 1 and "seq_len" not in adaptable):
            return fit, seq_len
        if "seq_len" in adaptable:
            short = n_tokens // FEWEST_WINDOWS + bos
            if short >= SHORTEST_WINDOW:
                return FEWEST_WINDOWS, short
    elif "seq_len" in adaptable and n_tokens // samples + bos >= SHORTEST_WINDOW:
        return samples, n_tokens // samples + bos
    holds = supported_windows(n_tokens, samples, seq_len, bos)
    raise StreamPruneError(
        f"calibration text has {n_tokens:,} tokens; --samples {samples} x --seq-len {seq_len} needs "
        f"{samples * (seq_len - bos):,}: " + ("use a longer text" if holds == "use a longer text" else
                                             f"it holds {holds}; or use a longer text"))


def token_windows(ids: list[int], n: int, seq_len: int, bos: int | None) -> torch.Tensor:
    """n windows of seq_len tokens, spread evenly over the text and never overlapping; each starts
    with BOS when the tokenizer uses one. Returns (n, seq_len) int64."""
    body = seq_len - (bos is not None)
    if len(ids) < n * body:
        fit_windows(len(ids), n, seq_len, bos is not None)  # raises, saying what the text holds
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


