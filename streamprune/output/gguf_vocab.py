"""A model folder's tokenizer as llama.cpp's GGUF tokenizer fields: tokenizer.json as transformers
uses it (its tokenizer class may set the pre-tokenizer from tokenizer_config.json, e.g. LlamaTokenizer's
add_prefix_space and legacy; the backend's own JSON says what it does), no code from the folder run.
Two kinds are supported, those of the Llama-family models:

- byte-level BPE (GPT-2 style: Llama 3, Qwen2/Qwen3, SmolLM): model `gpt2` with the merges and a
  pre-tokenizer name llama.cpp knows, found from the tokenizer's own pre-tokenizer (its regex);
- SentencePiece-style BPE (Llama 2, Mistral, llama2.c: `▁` for spaces, byte fallback): model
  `llama` with scores. llama.cpp merges the adjacent pair whose result scores highest; a token's
  score is minus the rank of the merge that makes it, so that is BPE's own order. Whether a space
  goes in front of the text (`add_space_prefix`) follows the tokenizer's Prepend normalizer or its
  Metaspace `prepend_scheme`; llama.cpp applies no other normalization.

BOS and EOS: whether the tokenizer adds them, and their ids, are read from what it does to a text.
Anything else is refused in one line naming what works."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StreamPruneError
from ..inputs.calibration import load_tokenizer
from ..store.input_files import is_input_file, read_json

# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# pre-tokenizer split regexes (as tokenizer.json writes them) -> llama.cpp's pre-tokenizer name
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_REGEXES = {
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2, Qwen2.5, Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    GPT2_REGEX: "gpt-2",
}
SUPPORTED = ("byte-level BPE with the GPT-2, Llama 3, Qwen2 or SmolLM pre-tokenizer, or SentencePiece-style "
             "BPE with byte fallback")


@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece style only: a space in front of the text
    chat_template: str | None = None


def read_vocab(folder: Path, vocab_size: int) -> GGUFVocab:
    """The tokenizer of `folder` for a model whose embedding has `vocab_size` rows (ids past the
    tokenizer's are written as unused padding tokens, as llama.cpp's converter does)."""
    path = Path(folder) / "tokenizer.json"
    if not is_input_file(path):
        raise StreamPruneError(f"no tokenizer.json in {folder}: llama.cpp needs the tokenizer in the GGUF file "
                               f"({SUPPORTED})")
    tokenizer = load_tokenizer(Path(folder))
    tok = effective_json(tokenizer) or read_json(path, f"{path} is not valid JSON")
    config = _tokenizer_config(folder)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise StreamPruneError(f"{path}: a {model.get('type')!r} tokenizer cannot be exported; supported: {SUPPORTED}")
    ids = _id_to_token(model["vocab"], tok.get("added_tokens") or [], vocab_size, path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if model.get("byte_fallback"):
        vocab = _sentencepiece_bpe(tok, ids, merges, path)
    else:
        vocab = _byte_level_bpe(tok, ids, merges, path)
    vocab.special = _special_ids(config, ids)
    bos, eos = added_special_ids(tokenizer)
    vocab.add_bos, vocab.add_eos = bos is not None, eos is not None
    vocab.special.update({k: i for k, i in (("bos", bos), ("eos", eos)) if i is not None})
    template = config.get("chat_template")
    if template is None and is_input_file(Path(folder) / "chat_template.jinja"):
        template = (Path(folder) / "chat_template.jinja").read_text(encoding="utf-8")
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def effective_json(tokenizer) -> dict | None:
    """tokenizer.json as the loaded tokenizer runs it (None when it has no `tokenizers` backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def added_special_ids(tokenizer) -> tuple[int | None, int | None]:
    """(the id the tokenizer puts in front of every text, the one it puts after it), as it tokenizes a
    text; None where it adds none."""
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    before, after = full[:start], full[start + len(plain):]
    return (before[0] if len(before) == 1 else None), (after[0] if len(after) == 1 else None)


def _tokenizer_config(folder: Path) -> dict:
    path = Path(folder) / "tokenizer_config.json"
    if not is_input_file(path):
        return {}
    config = read_json(path, f"{path} is not valid JSON")
    return config if isinstance(config, dict) else {}


def _id_to_token(vocab: dict, added: list, vocab_size: int, path: Path) -> list[tuple[str, bool, bool] | None]:
    """id -> (text, is added, is special) for every row of the embedding; None where no token is."""
    ids: list[tuple[str, bool, bool] | None] = [None] * vocab_size
    for text, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < vocab_size:
            raise StreamPruneError(f"{path}: token {text!r} has id {i!r}, outside the model's {vocab_size} rows")
        ids[i] = (text, False, False)
    for a in added:
        i = a.get("id")
        if not isinstance(i, int) or not 0 <= i < vocab_size or not isinstance(a.get("content"), str):
            raise StreamPruneError(f"{path}: added token {a!r} is outside the model's {vocab_size} rows")
        ids[i] = (a["content"], True, bool(a.get("special")))
    return ids


def _types(ids, byte_tokens: bool) -> tuple[list[str], list[int]]:
    tokens, types = [], []
    for i, entry in enumerate(ids):
        if entry is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text, added, special = entry
        tokens.append(text)
        if added:
            types.append(CONTROL if special else USER_DEFINED)
        elif byte_tokens and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return tokens, types


def _byte_level_bpe(tok: dict, ids, merges: list[str], path: Path) -> GGUFVocab:
    pre = _pre_tokenizer_name(tok.get("pre_tokenizer"), path)
    tokens, types = _types(ids, byte_tokens=False)
    return GGUFVocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)


def _pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """llama.cpp's name for this byte-level pre-tokenizer (the regex it splits with)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEXES:
            return SPLIT_REGEXES[regex]
    raise StreamPruneError(f"{path}: llama.cpp has no pre-tokenizer known to match this one "
                           f"({json.dumps(pre)[:120]}); supported: {SUPPORTED}")


SPACE = "\u2581"  # SentencePiece's '▁'
PREPEND = {"type": "Prepend", "prepend": SPACE}
SPACES = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}


def _sentencepiece_bpe(tok: dict, ids, merges: list[str], path: Path) -> GGUFVocab:
    tokens, types = _types(ids, byte_tokens=True)
    made_by = {}
    for rank, merge in enumerate(merges):
        made_by.setdefault(merge.replace(" ", ""), rank)
    scores = [-float(made_by[t]) - 1.0 if t in made_by else 0.0 for t in tokens]
    return GGUFVocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                     add_space_prefix=sentencepiece_space_prefix(tok, path))


def sentencepiece_space_prefix(tok: dict, path: Path) -> bool:
    """Whether a SentencePiece-style tokenizer puts '▁' in front of the text: its normalizer may only be
    SentencePiece's own (Prepend '▁', spaces replaced by '▁'), its pre-tokenizer Metaspace or none."""
    normalizer = tok.get("normalizer") or {}
    steps = [normalizer] if normalizer else []
    if normalizer.get("type") == "Sequence":
        steps = normalizer.get("normalizers") or []
    other = [s.get("type") for s in steps if s not in (PREPEND, SPACES)]
    if other:
        raise StreamPruneError(f"{path}: the normalizer ({', '.join(map(str, other))}) is not SentencePiece's, and "
                               f"llama.cpp applies none; supported: {SUPPORTED}")
    pre = tok.get("pre_tokenizer") or {}
    if pre and (pre.get("type") != "Metaspace" or pre.get("replacement", SPACE) != SPACE):
        raise StreamPruneError(f"{path}: a byte-fallback BPE whose pre-tokenizer is {pre.get('type')!r} cannot be "
                               f"exported; supported: {SUPPORTED}")
    if not pre and SPACES not in steps:
        raise StreamPruneError(f"{path}: a byte-fallback BPE without SentencePiece's '▁' spaces cannot be exported; "
                               f"supported: {SUPPORTED}")
    if PREPEND in steps:
        return True
    return bool(pre) and pre.get("prepend_scheme", "always") in ("first", "always")


def _special_ids(config: dict, ids) -> dict[str, int]:
    by_text = {e[0]: i for i, e in enumerate(ids) if e is not None}
    out = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in by_text:
            out[key] = by_text[value]
    return out
