"""Causal attention over packed documents: flash varlen on CUDA, per-document SDPA elsewhere.

Rows of a padding-free batch are laid end to end in one sequence of T tokens; `cu_seqlens` ([n+1],
int32) marks where each document starts. A token attends only to earlier tokens of its own document.

On CUDA, PyTorch's `torch.nn.attention.varlen.varlen_attn` runs Flash Attention's varlen kernel (no
padding, no mask tensor, GQA without repeating K/V). It is a young API whose arguments have moved
between releases, so the call adapts to its signature, and any failure switches, once and with one
log line, to the fallback: SDPA per document, which is exact and runs on any device.

With a shared prefix (collate.py), the first document is a prefix every other document attends to
before its own tokens: SDPA per document, each over [prefix; itself] with the matching causal mask.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

try:  # PyTorch >= 2.10 on CUDA; absent or unusable elsewhere
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    _PARAMS = set(inspect.signature(_varlen_attn).parameters)
except Exception:  # noqa: BLE001 - any import problem means: use the fallback
    _varlen_attn, _PARAMS = None, set()

_broken: list[str] = []  # the reason the varlen kernel was given up, once per process


def per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 prefix: int = 0) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]; exact causal SDPA on each document in turn.

    prefix > 0: the first document ([0, prefix)) is also seen, whole, by every later document."""
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:  # an empty document slot (a CUDA graph's fixed number of slots)
            continue
        qd, kd, vd = (t[s:e].transpose(0, 1) for t in (q, k, v))
        if prefix and s >= prefix:
            kd, vd = (torch.cat((t[:prefix].transpose(0, 1), td), dim=1) for t, td in ((k, kd), (v, vd)))
            mask = _after_prefix(prefix, e - s, q.device)
            out.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa).transpose(0, 1))
        else:
            out.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(out)


def _after_prefix(prefix: int, n: int, device: torch.device) -> torch.Tensor:
    """[n, prefix + n] bool: a document's token i sees the whole prefix and its own tokens 0..i."""
    own = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.cat((torch.ones(n, prefix, dtype=torch.bool, device=device), own), dim=1)


def _flash(q, k, v, cu_seqlens, max_seqlen: int) -> torch.Tensor:
    kw = {}
    if "is_causal" in _PARAMS:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # (left, right): everything before, nothing after = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _PARAMS:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def kernel_name(device: torch.device) -> str:
    """Which implementation `causal_varlen` will use on this device (for the run's log line)."""
    if device.type == "cuda" and _varlen_attn is not None and not _broken:
        return "flash varlen (torch.nn.attention.varlen)"
    return "SDPA per document"


def causal_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, prefix: int = 0) -> torch.Tensor:
    if prefix:  # the varlen kernel has no shared-prefix layout
        return per_document(q, k, v, cu_seqlens, prefix)
    if q.is_cuda and _varlen_attn is not None and not _broken:
        try:
            return _flash(q, k, v, cu_seqlens, max_seqlen)
        except Exception as e:  # noqa: BLE001 - unsupported dtype/head size/build: fall back, once, loudly
            _broken.append(f"{type(e).__name__}: {e}")
            print(f"note: flash varlen attention unavailable ({_broken[0][:200]}); using SDPA per document", flush=True)
    return per_document(q, k, v, cu_seqlens)
