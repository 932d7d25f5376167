"""The fused training step: the model's forward on a padding-free batch, with a chunked output loss.

`FusedStep(model, parts, dtype)` becomes the model's `forward` for training (install.py binds it), so
the Trainer, DDP, checkpoints, resume and saving see the same model and the same parameters; only
the arithmetic of a step changes:
- one sequence of real tokens per batch (no padding), attention per document (attention.py);
- frozen base weights of a projection group concatenated once into one matrix (the modules keep
  views of it, so no memory is added); trainable ones concatenated inside the compiled graph;
- LoRA as stacked A and block-diagonal B products (ops.py);
- the output layer's loss on target tokens only, in chunks, never holding the full logits (loss.py);
- on CUDA, the two halves of a decoder layer compiled once (torch.compile, dynamic shapes) and reused
  by every layer; a compile failure falls back to the same functions run eagerly, with one log line.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutput

from train.fast import ops
from train.fast.attention import causal_varlen, flash, flash_ready
from train.fast.loss import ce_chunk, linear_cross_entropy
from train.fast.plan import ModelParts, Proj

log = logging.getLogger(__name__)


class _MaybeCompiled:
    """fn compiled with torch.compile; if the first compiled call fails, fn itself from then on."""

    def __init__(self, fn: Callable, enabled: bool, grad_only: bool = True):
        self.fn, self.name = fn, getattr(fn, "__name__", "fn")
        self.compiled = torch.compile(fn, dynamic=True) if enabled else None
        self.proven = False
        self.grad_only = grad_only  # evaluation (no grad) runs eagerly rather than compiling a second graph

    def __call__(self, *args):
        if self.compiled is not None and (torch.is_grad_enabled() or not self.grad_only):
            if self.proven:
                return self.compiled(*args)
            try:
                out = self.compiled(*args)
                self.proven = True
                return out
            except Exception as e:  # noqa: BLE001 - a compiler failure must cost speed, not the run
                self.compiled = None
                msg = f"note: torch.compile of {self.name} failed ({type(e).__name__}: {str(e)[:200]}); running it eagerly"
                log.warning(msg)
                print(msg, flush=True)
        return self.fn(*args)


def _fuse_frozen(group: list[Proj], dtype: torch.dtype) -> torch.Tensor:
    """One matrix for a frozen group; its modules' weights become views of it (no copy is kept)."""
    w = torch.cat([p.linear.weight.detach() for p in group]).to(dtype)
    if all(p.linear.weight.dtype == dtype for p in group):
        off = 0
        for p in group:
            n = p.linear.weight.shape[0]
            p.linear.weight.data = w[off:off + n]
            off += n
    return w


class FusedStep:
    def __init__(self, model: torch.nn.Module, parts: ModelParts, dtype: torch.dtype, compile: bool,
                 stack: bool = False):
        self.model, self.p, self.dtype = model, parts, dtype
        self.frozen = not any(p.linear.weight.requires_grad for layer in parts.layers for g in layer.groups for p in g)
        self._fused: list[list[torch.Tensor | None]] | None = None  # built at the first step, on the training device
        self._zeros: dict[tuple, torch.Tensor] = {}
        p = parts
        eps, heads, kv, hd = p.eps, p.heads, p.kv_heads, p.head_dim

        def attention_in(h, ln, qkv, cos, sin, training):
            return ops.attention_in(h, ln, eps, qkv, cos, sin, heads, kv, hd, training)

        def attention_out_mlp(h, a, o, ln, gate_up, down, training):
            return ops.attention_out_mlp(h, a, o, ln, eps, gate_up, down, training)

        def final_norm(h, w):
            return ops.rms_norm(h, w, eps)

        if compile:  # one graph per half-layer serves all layers; the limit covers several models in one process
            limits = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(limits, name):
                    setattr(limits, name, max(getattr(limits, name), 64))
        self._in = _MaybeCompiled(attention_in, compile)
        self._out = _MaybeCompiled(attention_out_mlp, compile)
        self._norm = _MaybeCompiled(final_norm, compile)
        self._ce = _MaybeCompiled(ce_chunk, compile, grad_only=False)  # runs inside an autograd.Function: no grad mode
        self.stack = compile and stack and flash_ready()

        def decoder_stack(h, cos, sin, cu_seqlens, max_seqlen, weights, lns, norm, training):
            for (qkv, o, gate_up, down), (ln_in, ln_post) in zip(weights, lns):
                q, k, v = ops.attention_in(h, ln_in, eps, qkv, cos, sin, heads, kv, hd, training)
                a = flash(q, k, v, cu_seqlens, max_seqlen)
                h = ops.attention_out_mlp(h, a, o, ln_post, eps, gate_up, down, training)
            return ops.rms_norm(h, norm, eps)

        self._stack = _MaybeCompiled(decoder_stack, self.stack)

    # -- the tensors of one projection group, as ops.project takes them ----------------------------
    def _zero(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        key = (shape, like.dtype, like.device)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._zeros[key]

    def _fuse(self, device: torch.device) -> None:
        """Frozen groups as one matrix each, on the device the model trains on (after the Trainer moved it)."""
        stale = self._fused is None or (self.frozen and self._fused[0][0].device != device)
        if stale:
            self._fused = [[_fuse_frozen(g, self.dtype) if self.frozen else None for g in layer.groups]
                           for layer in self.p.layers]

    def _weights(self, i: int, j: int) -> ops.Weights:
        group = self.p.layers[i].groups[j]
        fused = self._fused[i][j]
        ws = [fused] if fused is not None else [p.linear.weight for p in group]
        bs = None
        if any(p.linear.bias is not None for p in group):
            bs = [p.linear.bias if p.linear.bias is not None else self._zero((p.linear.out_features,), p.linear.weight)
                  for p in group]
        lora = [p.lora for p in group if p.lora]
        if not lora:
            return ws, bs, None, None, 1.0, 0.0
        r, ref = lora[0].A.shape[0], lora[0].A
        As = [p.lora.A if p.lora else self._zero((r, p.linear.in_features), ref) for p in group]
        Bs = [p.lora.B if p.lora else self._zero((p.linear.out_features, r), ref) for p in group]
        return ws, bs, As, Bs, lora[0].scale, lora[0].dropout

    # -- the step ---------------------------------------------------------------------------------
    def _layer(self, i: int, h, cos, sin, cu_seqlens, max_seqlen: int, training: bool):
        layer = self.p.layers[i]
        q, k, v = self._in(h, layer.ln_in, self._weights(i, 0), cos, sin, training)
        a = causal_varlen(q, k, v, cu_seqlens, max_seqlen)
        return self._out(h, a, self._weights(i, 1), layer.ln_post, self._weights(i, 2), self._weights(i, 3), training)

    def __call__(self, input_ids: torch.Tensor, shift_labels: torch.Tensor, position_ids: torch.Tensor,
                 cu_seqlens: torch.Tensor, max_seqlen: int, target_positions: torch.Tensor,
                 num_items_in_batch: Any = None, **_: Any) -> CausalLMOutput:
        p, training = self.p, self.model.training
        self._fuse(input_ids.device)
        h = F.embedding(input_ids.view(-1), p.embed.weight).to(self.dtype)
        cos, sin = p.rotary(h, position_ids.view(1, -1))
        cos, sin = cos[0, :, None, :].to(self.dtype), sin[0, :, None, :].to(self.dtype)
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        recompute = training and torch.is_grad_enabled() and getattr(lm, "is_gradient_checkpointing", False)
        if self.stack and not recompute and torch.is_grad_enabled() and self._stack.compiled is not None:
            weights = [tuple(self._weights(i, j) for j in range(4)) for i in range(len(p.layers))]
            lns = [(layer.ln_in, layer.ln_post) for layer in p.layers]
            h = self._stack(h, cos, sin, cu_seqlens, max_seqlen, weights, lns, p.norm, training)
            return self._loss(h, shift_labels, target_positions, num_items_in_batch)
        for i in range(len(p.layers)):
            if recompute:
                h = checkpoint(self._layer, i, h, cos, sin, cu_seqlens, max_seqlen, training, use_reentrant=False)
            else:
                h = self._layer(i, h, cos, sin, cu_seqlens, max_seqlen, training)
        return self._loss(self._norm(h, p.norm), shift_labels, target_positions, num_items_in_batch)

    def _loss(self, h, shift_labels, target_positions, num_items_in_batch) -> CausalLMOutput:
        p = self.p
        targets = shift_labels.view(-1).index_select(0, target_positions)
        total = linear_cross_entropy(h.index_select(0, target_positions), p.head.weight.to(self.dtype), targets, self._ce)
        denom = num_items_in_batch if num_items_in_batch is not None else max(target_positions.numel(), 1)
        return CausalLMOutput(loss=total / denom)
