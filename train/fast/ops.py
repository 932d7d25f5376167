"""The fused step's tensor functions: pure functions of tensors, so one compiled graph serves every layer.

Each projection group reads one input: (q, k, v), (o), (gate, up), (down). A group is one matrix
product for its base weights (concatenated) and, with LoRA, one product for its stacked A matrices and
one for its block-diagonal B: 3 launches where peft's per-module layers issue 6 per module (18 for
q, k, v). `Weights` is a tuple so that torch.compile treats it as plain inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (base weights, biases or None, LoRA As or None, LoRA Bs or None, scale, dropout)
Weights = tuple


def _one(ts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return (ts[0] if len(ts) == 1 else torch.cat(ts)).to(dtype)


def project(x: torch.Tensor, w: Weights, training: bool) -> torch.Tensor:
    ws, bs, As, Bs, scale, p = w
    y = F.linear(x, _one(ws, x.dtype), None if bs is None else _one(bs, x.dtype))
    if As is not None:
        xd = F.dropout(x, p, training) if p > 0 else x
        b = (Bs[0] if len(Bs) == 1 else torch.block_diag(*Bs)).to(x.dtype)
        y = y + F.linear(F.linear(xd, _one(As, x.dtype)), b) * scale
    return y


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: statistics in fp32, the result back in h's dtype."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(h.dtype) * x.to(h.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, 1, D]: rotary positions as transformers applies them (rotate_half).

    cos and sin repeat their first half (transformers builds them as cat(freqs, freqs)), so with x = (x1, x2)
    x * cos + rotate_half(x) * sin = (x1 c - x2 s, x2 c + x1 s), c and s the first halves: the same roundings
    (negation is exact), half the cos/sin reads, and a backward without rotate_half's slice/neg/cat."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def attention_in(h, ln, eps: float, qkv: Weights, cos, sin, heads: int, kv_heads: int, head_dim: int,
                 training: bool):
    """Pre-attention half of a decoder layer: norm, fused q/k/v projection, rotary positions."""
    y = project(rms_norm(h, ln, eps), qkv, training)
    q, k, v = y.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    t = h.shape[0]
    return (rope(q.reshape(t, heads, head_dim), cos, sin), rope(k.reshape(t, kv_heads, head_dim), cos, sin),
            v.reshape(t, kv_heads, head_dim))


def attention_out_mlp(h, a, o: Weights, ln, eps: float, gate_up: Weights, down: Weights, training: bool):
    """Post-attention half: output projection + residual, norm, SwiGLU MLP + residual."""
    h = h + project(a.flatten(1), o, training)
    g, u = project(rms_norm(h, ln, eps), gate_up, training).chunk(2, dim=-1)
    return h + project(F.silu(g) * u, down, training)
