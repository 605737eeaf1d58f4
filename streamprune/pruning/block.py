"""The decoder block forward (Llama / Mistral / Qwen2 / Qwen3), with optional masks on query
heads and MLP neurons. Weights are a dict of short names (see families.BLOCK_TENSORS).

Masks may carry a leading batch of M masks: head_mask (M, H) and neuron_mask (M, I) evaluate M
pruned variants of the block on the same input in one call (outputs (M, B, T, E)), which is what
perturbative scoring needs. The attention itself does not depend on the masks and is computed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..arch.spec import BlockSpec

Weights = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' rotate_half layout. x: (B, n, T, D); cos, sin: (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def causal_mask(T: int, window: int | None, device) -> torch.Tensor | None:
    """None for plain causal attention; a boolean (T, T) mask when a sliding window bites."""
    if window is None or T <= window:
        return None
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def attention_heads(W: Weights, spec: BlockSpec, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Per-head attention outputs before o_proj. x: (B, T, E) -> (B, T, H, D)."""
    B, T, _ = x.shape
    H, KV, D = spec.n_heads, spec.n_kv, spec.head_dim
    h = rms_norm(x, W["attn_norm"], spec.eps)
    q = F.linear(h, W["q"], W.get("q_bias")).view(B, T, H, D)
    k = F.linear(h, W["k"], W.get("k_bias")).view(B, T, KV, D)
    v = F.linear(h, W["v"], W.get("v_bias")).view(B, T, KV, D)
    if spec.qk_norm:
        q, k = rms_norm(q, W["q_norm"], spec.eps), rms_norm(k, W["k_norm"], spec.eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
    q, k = rotate(q, cos[:T], sin[:T]), rotate(k, cos[:T], sin[:T])
    k = k.repeat_interleave(spec.group, dim=1)  # (B, H, T, D): query head h reads KV head h // group
    v = v.repeat_interleave(spec.group, dim=1)
    mask = causal_mask(T, spec.sliding_window, x.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=D ** -0.5)
    return out.transpose(1, 2)  # (B, T, H, D)


def mlp_activations(W: Weights, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activations, the inputs of down_proj: (..., E) -> (..., I)."""
    return F.silu(F.linear(x, W["gate"], W.get("gate_bias"))) * F.linear(x, W["up"], W.get("up_bias"))


def attention_output(W: Weights, heads: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """o_proj over (masked) head outputs. heads: (B, T, H, D); head_mask: (H,) or (M, H)."""
    if head_mask is not None:
        if head_mask.dim() == 2:  # (M, H) -> outputs (M, B, T, E)
            heads = heads[None] * head_mask[:, None, None, :, None].to(heads.dtype)
        else:
            heads = heads * head_mask[:, None].to(heads.dtype)
    return F.linear(heads.flatten(-2), W["o"], W.get("o_bias"))


def mlp_output(W: Weights, spec: BlockSpec, h: torch.Tensor, neuron_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP branch given the residual stream after attention. h: (..., B, T, E)."""
    a = mlp_activations(W, rms_norm(h, W["mlp_norm"], spec.eps))
    if neuron_mask is not None:
        if neuron_mask.dim() == 2:  # (M, I) against a leading M on h
            neuron_mask = neuron_mask[:, None, None, :]
        a = a * neuron_mask.to(a.dtype)
    return F.linear(a, W["down"], W.get("down_bias"))


def block_forward(W: Weights, spec: BlockSpec, x: torch.Tensor, cos, sin,
                  head_mask: torch.Tensor | None = None,
                  neuron_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder block: x + attn(x), then + mlp. x: (B, T, E) -> (B, T, E), or (M, B, T, E)
    when either mask has a leading M."""
    h = x + attention_output(W, attention_heads(W, spec, x, cos, sin), head_mask)
    return h + mlp_output(W, spec, h, neuron_mask)
