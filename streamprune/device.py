"""Where a run computes: the --device argument (cpu, cuda, cuda:N) and the dtype its blocks
compute in there."""

from __future__ import annotations

import torch

from .errors import StreamPruneError


def parse_device(device: str) -> torch.device:
    """cpu, cuda or cuda:N, present here or not (plan describes a device it may not have)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise StreamPruneError(f"unsupported device {device!r} (cpu or cuda)")
    return dev


def check_device(device: str) -> torch.device:
    """A device this machine has (cuda:N: a GPU of that number)."""
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StreamPruneError("--device cuda requested but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise StreamPruneError(f"--device {device}: this machine has {n} CUDA GPU{'s' if n > 1 else ''} "
                               f"(cuda:0 to cuda:{n - 1})")
    return dev


def compute_dtype(dev: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU; the model's own dtype on a GPU."""
    return torch.float32 if dev.type == "cpu" else model_dtype
