"""llama.cpp, from the prebuilt `xllamacpp` wheel, as a reference for the GGUF export: the
log-probability of every token of a text given the ones before it, greedy generation, and
tokenization, with exact arithmetic settings (f32 KV cache, no flash attention) unless told.

Per-position log-probabilities come from llama.cpp's own completion API: one request per
position, the prompt being the tokens so far (the slot's KV cache is reused, so each request
evaluates one token), the next token forced by a logit bias, and its log-probability read from
the raw logits (llama.cpp reports them before its samplers, bias included, apply)."""

from __future__ import annotations

import json
import math
import urllib.request
from contextlib import contextmanager


@contextmanager
def llama_cpp(gguf, n_ctx: int = 512, threads: int = 2, exact: bool = True):
    import xllamacpp as x
    p = x.CommonParams()
    p.model.path = str(gguf)
    p.n_ctx = n_ctx
    p.n_parallel = 1
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.warmup = False
    if exact:
        p.flash_attn_type = x.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.cache_type_k = x.ggml_type.GGML_TYPE_F32
        p.cache_type_v = x.ggml_type.GGML_TYPE_F32
    server = x.Server(p)
    try:
        yield LlamaCpp(server)
    finally:
        del server


class LlamaCpp:
    def __init__(self, server):
        self.server = server

    def complete(self, **request) -> dict:
        r = self.server.handle_completions(dict(request, cache_prompt=True, temperature=0))
        if "error" in r:
            raise RuntimeError(f"llama.cpp: {r['error']}")
        return r["choices"][0]

    def logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[k] | ids[:k]) for k = 1 .. len(ids) - 1."""
        out = []
        for k in range(1, len(ids)):
            c = self.complete(prompt=ids[:k], n_predict=1, n_probs=1, logit_bias=[[ids[k], 1e4]])
            step = c["logprobs"]["content"][0]
            assert step["id"] == ids[k], (step["id"], ids[k])
            out.append(step["logprob"])
        return out

    def nll(self, windows) -> float:
        """Mean negative log-likelihood over windows (each predicting its len - 1 next tokens)."""
        total = count = 0
        for w in windows:
            lp = self.logprobs([int(t) for t in w])
            total -= sum(lp)
            count += len(lp)
        return total / count

    def perplexity(self, windows) -> float:
        return math.exp(self.nll(windows))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        c = self.complete(prompt=ids, n_predict=n, n_probs=1, ignore_eos=True)
        return [step["id"] for step in c["logprobs"]["content"]]

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        body = json.dumps({"content": text, "add_special": add_special}).encode()
        req = urllib.request.Request(f"{self.server.listening_address}/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["tokens"]


def loader_gap(folder, gguf, ids: list[int]) -> float:
    """The largest difference between llama.cpp's log-probability of each of `ids` (the GGUF file,
    exactly) and streamprune.load_pretrained's (the folder it was exported from, in float32)."""
    import torch

    from streamprune import load_pretrained
    with torch.no_grad():
        ref = load_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = ref[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    with llama_cpp(gguf) as llm:
        got = torch.tensor(llm.logprobs(ids))
    return float((got - want).abs().max())
