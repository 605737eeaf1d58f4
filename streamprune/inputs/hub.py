"""A model argument as a local folder: a path that exists is used as it is; an `org/name` that is
no local path is a Hugging Face Hub model id, found in (or downloaded into) the Hub cache through
huggingface_hub, which transformers already depends on.

Only what a run reads is downloaded: config.json, generation_config.json, the tokenizer files and
the safetensors weights (the shards the index names, or model.safetensors). Never code (.py),
never pickled or other weight formats (.bin, .pt, .gguf, consolidated.safetensors). Downloads go
into the Hub cache (HF_HUB_CACHE, HF_HOME) and resume where an interrupted one stopped;
HF_HUB_OFFLINE=1 uses the cache only."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import StreamPruneError
from ..store.shards import INDEX

UNSHARDED = "model.safetensors"  # the weights of a model saved in one file
NO_SAFETENSORS = ("Hugging Face Hub model {} has no model.safetensors or " + INDEX + ": streamprune reads "
                  "safetensors weights only (never pickled .bin files)")
# the small files a run reads or copies into the output (tokenizer, generation settings, license)
SMALL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
               "chat_template.jinja", "LICENSE*", "README.md", INDEX]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_hub_id(text: str) -> bool:
    """`org/name` as the Hub spells model ids (one slash, letters, digits, '-', '_', '.'; no '--'
    or '..'). A bare name, a path starting with '.', '/' or '~', or more slashes is a path."""
    parts = text.split("/")
    return (len(parts) == 2 and all(NAME.fullmatch(p) for p in parts)
            and "--" not in text and ".." not in text and not text.endswith(".git"))


def resolve_model(arg, revision: str | None = None, progress: bool = True, notify=None) -> Path:
    """The local folder of a model argument. A path that exists always wins; an argument that is
    neither a path nor a Hub id is returned as it is (the caller's "model folder not found"). A Hub
    id's snapshot is downloaded (with progress bars if `progress` and stderr is a terminal: a bar
    written to a log is one line of carriage returns) and `notify(text)` told which."""
    path = Path(arg)
    if path.exists() or not is_hub_id(str(arg)):
        if revision is not None:
            raise StreamPruneError(f"--revision is for Hugging Face Hub ids; {arg} is a local path")
        return path
    if not progress or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    folder = download_model(str(arg), revision)
    if notify is not None:
        notify(f"{arg}: Hugging Face Hub snapshot {folder}")
    return folder


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of `repo_id` in the Hub cache, with every file a run needs: the small
    files and the index first, then exactly the shards the index names (pinned to the commit the
    first call resolved, so the two calls cannot see different revisions)."""
    folder = snapshot(repo_id, revision, SMALL_FILES)
    commit = folder.name  # snapshots/<commit>
    shards = needed_weights(folder, repo_id)
    folder = snapshot(repo_id, commit, SMALL_FILES + shards)
    missing = [name for name in ["config.json", *shards] if not (folder / name).is_file()]
    if shards == [UNSHARDED] and missing == [UNSHARDED]:
        raise StreamPruneError(NO_SAFETENSORS.format(repo_id))
    if missing:
        raise StreamPruneError(f"Hugging Face Hub model {repo_id} (commit {commit[:12]}) is missing "
                               f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                               "an interrupted download? run again with network access to finish it")
    return folder


def needed_weights(folder: Path, repo_id: str) -> list[str]:
    """The weight files a run reads from a snapshot holding the small files: the shards its index
    names, or the one model.safetensors."""
    return weight_files(folder / INDEX, repo_id) if (folder / INDEX).is_file() else [UNSHARDED]


def weight_files(index: Path, repo_id: str) -> list[str]:
    """The shard files an index names (plain names in the snapshot's top folder only)."""
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StreamPruneError(f"{repo_id}: {INDEX} is not a valid safetensors index") from None
    bad = [f for f in files
           if not isinstance(f, str) or "/" in f or f.startswith(".") or not f.endswith(".safetensors")]
    if bad:
        raise StreamPruneError(f"{repo_id}: {INDEX} names a file streamprune does not read: {bad[0]!r}")
    return files


def snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download limited to `patterns`, its failures as one-line StreamPruneErrors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    where = f"Hugging Face Hub model {repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise StreamPruneError(f"{where} is gated: accept its terms on huggingface.co and log in "
                               "(hf auth login or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise StreamPruneError(f"{where}: no such revision") from None
    except RepositoryNotFoundError:
        raise StreamPruneError(f"model folder not found: {repo_id}, and no Hugging Face Hub model of that id "
                               "(or it is private: hf auth login)") from None
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not (completely) in the cache
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise StreamPruneError(f"model folder not found: {repo_id}; as a Hugging Face Hub id it is not (completely) "
                               f"in the cache {constants.HF_HUB_CACHE} and {reason}") from None
    except (EntryNotFoundError, HfHubHTTPError) as e:
        raise StreamPruneError(f"downloading {where} failed: {str(e).splitlines()[0][:200]}") from None


def model_for_planning(arg, revision: str | None = None):
    """inspect and plan: a local folder (as resolve_model); a Hub id completely in the cache, its
    snapshot folder; any other Hub id, a model.Model from the Hub's safetensors headers (a few
    HTTP range reads per shard) and its small files, so nothing the size of the weights is
    downloaded to see whether a run would fit."""
    if Path(arg).exists() or not is_hub_id(str(arg)):  # a local folder: huggingface_hub is not needed
        return resolve_model(arg, revision)
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return resolve_model(arg, revision)
    return cached_model(str(arg), revision) or remote_model(str(arg), revision)


def cached_model(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder when every file a run needs is in the cache, else None (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SMALL_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    shards = needed_weights(folder, repo_id)
    return folder if all((folder / name).is_file() for name in ["config.json", *shards]) else None


def remote_model(repo_id: str, revision: str | None):
    """model.Model of a Hub model from its config.json (downloaded) and safetensors headers (read
    remotely by huggingface_hub.get_safetensors_metadata)."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError, SafetensorsParsingError

    from ..arch.model import model_from_headers
    from ..store.safetensors_header import TensorInfo
    folder = snapshot(repo_id, revision, SMALL_FILES)
    try:
        meta = get_safetensors_metadata(repo_id, revision=folder.name)
    except NotASafetensorsRepoError:
        raise StreamPruneError(NO_SAFETENSORS.format(repo_id)) from None
    except (SafetensorsParsingError, HfHubHTTPError) as e:
        raise StreamPruneError(f"reading the safetensors headers of {repo_id} failed: "
                               f"{str(e).splitlines()[0][:200]}") from None
    tensors = {}
    for file, info in sorted(meta.files_metadata.items()):
        for name, t in info.tensors.items():
            # offsets relative to the data: the file is not here, nothing is read from it
            tensors[name] = TensorInfo(folder / file, t.dtype, tuple(t.shape), *t.data_offsets)
    return model_from_headers(folder, tensors)
