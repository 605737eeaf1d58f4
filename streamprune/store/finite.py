"""NaN and Inf checks: of the input's tensors (in chunks, so they cost little memory), of a
block's weights as read, and of the activations a block writes to the cache."""

from __future__ import annotations

import torch

from ..errors import StreamPruneError

FINITE_CHUNK = 1 << 24  # elements checked for NaN/Inf at a time, so the check needs little extra memory


def first_bad_value(t: torch.Tensor) -> str | None:
    """'NaN' or 'Inf' if t holds one (checked in chunks), else None."""
    flat = t.detach().reshape(-1)
    if not flat.is_floating_point():
        return None
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start:start + FINITE_CHUNK]
        # min and max carry a NaN or an Inf through; about 10x faster than isfinite().all() on a CPU
        if not torch.isfinite(torch.stack(torch.aminmax(chunk))).all():
            return "NaN" if torch.isnan(chunk).any() else "Inf"
    return None


def check_finite_tensor(t: torch.Tensor, name: str) -> None:
    """Refuse the input model when its tensor `name` (or a part of it, `t`) holds a NaN or an Inf."""
    bad = first_bad_value(t)
    if bad:
        raise StreamPruneError(f"tensor {name} contains {bad} values; the input model is damaged")


def check_finite_weights(tensors: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """`tensors` by short name; `names` maps short names to the stored tensor names."""
    for short, t in tensors.items():
        check_finite_tensor(t, names[short])


def check_finite_activations(y: torch.Tensor, layer: int, first_sample: int) -> None:
    bad = first_bad_value(y)
    if bad:
        raise StreamPruneError(f"layer {layer} produced {bad} activations on calibration samples from "
                               f"{first_sample}; the model's weights or dtype overflow on this input")
