"""Streaming perplexity with the pruning engine: one block in memory at a time, activations through
the on-disk cache, the final norm and lm_head applied in vocabulary chunks with a running
log-sum-exp, so the (tokens x vocab) logits never exist at once.

Convention (the one in shared/models/README.md): the whole text is tokenized as one stream, as the
tokenizer does by default (a Llama tokenizer puts one BOS at the very start, Qwen's none), cut into
non-overlapping windows of seq_len tokens (the tail shorter than a window is dropped), and every
window predicts its seq_len - 1 next tokens. Perplexity = exp(mean negative log-likelihood)."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..arch.families import rotary_tables
from ..arch.model import model_compute_dtype, open_model
from ..arch.spec import FINAL_NORM
from ..device import check_device, compute_dtype
from ..errors import StreamPruneError
from ..inputs.calibration import (
    check_tokens_fit,
    check_window,
    default_window,
    load_tokenizer,
    tokenize_file,
    write_embeddings,
)
from ..planning.plan import activation_bytes
from ..pruning.block import block_forward, rms_norm
from ..store.cache import EVAL_PREFIX, ActivationCache
from ..store.documents import as_source
from ..store.safetensors_header import DTYPES
from .stream import BlockStream, progress_bar

log = logging.getLogger(__name__)

WORKING_BYTES = 256 * 2**20  # activations of one micro-batch, and logits of one vocab chunk


@dataclass(frozen=True)
class EvalResult:
    text: str
    text_sha256: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    nll: float  # mean negative log-likelihood, nats per token
    ppl: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def choose_seq_len(config: dict, requested: int | None, option: str = "--seq-len") -> int:
    """The evaluation window, one rule for `eval` and `run --eval`: the one asked for, or the default
    window (2048 tokens, at most max_position_embeddings); never past max positions."""
    if not requested:
        return default_window(config)
    if requested < 2:
        raise StreamPruneError(f"{option} must be >= 2")
    check_window(config, requested, option)
    return requested


def eval_windows(ids: list[int], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the stream: (n, seq_len) int64."""
    n = len(ids) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise StreamPruneError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def micro_batch(arch, seq_len: int, windows: int, requested: int = 0) -> int:
    if requested:
        return min(requested, windows)
    batch = 1
    while batch < windows and activation_bytes(arch.widest, seq_len, batch + 1) <= WORKING_BYTES:
        batch += 1
    return batch


def vocab_chunk(vocab: int, hidden: int, tokens_per_batch: int) -> int:
    """Rows of lm_head per chunk: the chunk (fp32) and one micro-batch of its logits each fit
    in WORKING_BYTES."""
    return max(1, min(vocab, WORKING_BYTES // (4 * max(hidden, tokens_per_batch))))


# ---- the math: pure functions over tensors ----

def nll_state(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp over the vocabulary seen so far, logit of the target) per token, fp64."""
    return (torch.full(shape, -math.inf, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))


def update_nll(state, logits: torch.Tensor, targets: torch.Tensor, lo: int):
    """Fold one vocab chunk [lo, lo + c) into the state. logits: (..., c); targets: (...) ids."""
    lse, target_logit = state
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1).double().cpu())
    local = (targets - lo).to(logits.device)
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(inside.cpu(), picked.double().cpu(), target_logit)
    return lse, target_logit


def nll_sum(state) -> float:
    lse, target_logit = state
    return (lse - target_logit).sum().item()


# ---- the I/O shell ----

def pass_blocks(stream: BlockStream, bar, cos, sin) -> None:
    """Pass the cached inputs through every block: inputs-i -> inputs-(i+1), one block in memory at
    a time, each counted on `bar`."""
    for layer in stream.blocks(0, bar):
        stored = stream.read(layer)
        dtype = stream.dtype(stored)
        W = {k: t.to(stream.device, dtype) for k, t in stored.items()}
        del stored
        writer = stream.outputs(layer)
        with torch.no_grad():
            for start, x in stream.batches(layer, dtype):
                writer.write(start, block_forward(W, stream.model.arch.blocks[layer], x, cos, sin))
        writer.commit()
        stream.cache.drop(layer)
        del W


def head_nll(stream: BlockStream, tokens: torch.Tensor, chunk: int) -> float:
    """Sum of -log p(next token) over all windows, from the final hidden states (the cached outputs
    of the last block). Outer loop over vocab chunks (each row of lm_head read once), inner over
    micro-batches of the hidden states."""
    arch, index, device = stream.model.arch, stream.model.index, stream.device
    head = arch.head_tensor
    dtype = compute_dtype(device, DTYPES[index.tensors[head].dtype])
    norm = index.load({"n": FINAL_NORM}, device, dtype)["n"]
    targets = tokens[:, 1:]  # (n, T-1): window position t predicts token t+1
    state = nll_state(tuple(targets.shape))
    with torch.no_grad():
        for lo in range(0, arch.vocab, chunk):
            hi = min(lo + chunk, arch.vocab)
            W = index.rows(head, torch.arange(lo, hi)).to(device, dtype)  # (c, E)
            for start, x in stream.batches(arch.n_layers, dtype, tick=False):
                stop = start + x.shape[0]
                x = x[:, :-1]  # (b, T-1, E)
                logits = rms_norm(x, norm, arch.blocks[-1].eps) @ W.T  # (b, T-1, c)
                part = (state[0][start:stop], state[1][start:stop])
                lse, tl = update_nll(part, logits, targets[start:stop], lo)
                state[0][start:stop], state[1][start:stop] = lse, tl
            del W
    return nll_sum(state)


def perplexity(folder: Path, text, seq_len: int | None = None, device: str = "cpu",
               batch_size: int = 0, max_windows: int | None = None, cache_dir: Path | None = None,
               progress: bool = False, label: str = "evaluating") -> EvalResult:
    """Perplexity of the model in `folder` on `text` (a path or a documents.TextSource),
    streaming one block at a time."""
    t0 = time.time()
    dev = check_device(device)
    model = open_model(folder)
    T = choose_seq_len(model.arch.config, seq_len)
    source = as_source(text)
    tokens = eval_windows(tokenize_file(load_tokenizer(model.folder), source, special_tokens=True), T, max_windows)
    check_tokens_fit(model.index, tokens)  # before any cache exists
    n = tokens.shape[0]
    batch = micro_batch(model.arch, T, n, batch_size)
    cos, sin = rotary_tables(model.arch.config, T, dev)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=EVAL_PREFIX, dir=cache_dir) as tmp:
        cache = ActivationCache(Path(tmp), n, T, model.arch.hidden, model_compute_dtype(model, dev))
        write_embeddings(cache, model.index, tokens, batch)
        # counts the blocks, then the final norm and lm_head
        L = model.arch.n_layers
        stream = BlockStream(model, cache, dev, batch, n)
        with progress_bar(f"{label} ({L} blocks + head)", L + 1, 0, progress, unit="step") as bar:
            pass_blocks(stream, bar, cos, sin)
            total = head_nll(stream, tokens, vocab_chunk(model.arch.vocab, model.arch.hidden, batch * T))
            bar.update(1)
    count = n * (T - 1)
    nll = total / count
    return EvalResult(text=source.describe(), text_sha256=source.sha256(),
                      seq_len=T, windows=n, tokens=count, nll=nll, ppl=math.exp(nll),
                      seconds=round(time.time() - t0, 3))
