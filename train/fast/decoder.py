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
  by every layer; a compile failure falls back to the same functions run eagerly, with one log line;
- with LoRA on CUDA (`graphs=True`), the whole stack's forward and backward replayed from a CUDA graph
  per bucket of token count (graphs.py): the host-bound LoRA step's ~1,600 launches become two.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutput

from train.fast import ops
from train.fast.attention import causal_varlen
from train.fast.graphs import StackGraphs, graphable
from train.fast.loss import ce_chunk, linear_cross_entropy
from train.fast.plan import ModelParts, Proj


# bf16 roundings at the functions' explicit casts kept inside fused kernels, as the eager step rounds
COMPILE_OPTIONS = {"emulate_precision_casts": True}


class _MaybeCompiled:
    """fn compiled with torch.compile; if the first compiled call fails, fn itself from then on."""

    def __init__(self, fn: Callable, enabled: bool, grad_only: bool = True):
        self.fn, self.name = fn, getattr(fn, "__name__", "fn")
        self.compiled = torch.compile(fn, dynamic=True, options=COMPILE_OPTIONS) if enabled else None
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
                print(f"note: torch.compile of {self.name} failed ({type(e).__name__}: {str(e)[:200]}); "
                      f"running it eagerly", flush=True)
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
                 graphs: bool = False):
        self.model, self.p, self.dtype = model, parts, dtype
        self.frozen = not any(p.linear.weight.requires_grad for layer in parts.layers for g in layer.groups for p in g)
        self.graphs = self._graphs_for(parts) if graphs else None
        # per layer, the four groups' tensors as ops.project takes them: built at the first step, on the training
        # device (after the Trainer moved the model), then reused: a step only reads them
        self._groups: list[tuple[ops.Weights, ...]] | None = None
        self._device: torch.device | None = None
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

    def _graphs_for(self, parts: ModelParts) -> StackGraphs | None:
        """CUDA graphs of the stack when only the adapters train; else None, with one line saying why."""
        projs = [p for layer in parts.layers for g in layer.groups for p in g]
        params = [t for p in projs if p.lora for t in (p.lora.A, p.lora.B)]
        frozen = [parts.embed.weight, parts.norm, *(p.linear.weight for p in projs),
                  *(p.linear.bias for p in projs if p.linear.bias is not None),
                  *(w for layer in parts.layers for w in (layer.ln_in, layer.ln_post))]
        why = graphable(params, frozen)
        if why:
            print(f"note: CUDA graphs of the fused step off ({why}); the step runs eagerly", flush=True)
            return None
        return StackGraphs(lambda h, cos, sin, cu, n: self._stack(h, cos, sin, cu, n, True), params)

    # -- the tensors of one projection group, as ops.project takes them ----------------------------
    def _zero(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        key = (shape, like.dtype, like.device)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._zeros[key]

    def _prepare(self, device: torch.device) -> None:
        """Each group's tensors, frozen groups fused into one matrix; again only if the model moved device."""
        if self._groups is None or self._device != device:
            self._groups = [tuple(self._weights(g) for g in layer.groups) for layer in self.p.layers]
            self._device = device

    def _weights(self, group: list) -> ops.Weights:
        ws = [_fuse_frozen(group, self.dtype)] if self.frozen else [p.linear.weight for p in group]
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
    def _layer(self, i: int, h, cos, sin, cu_seqlens, max_seqlen: int, training: bool, prefix: int = 0):
        layer, (qkv, o, gate_up, down) = self.p.layers[i], self._groups[i]
        q, k, v = self._in(h, layer.ln_in, qkv, cos, sin, training)
        a = causal_varlen(q, k, v, cu_seqlens, max_seqlen, prefix)
        return self._out(h, a, o, layer.ln_post, gate_up, down, training)

    def __call__(self, input_ids: torch.Tensor, shift_labels: torch.Tensor, position_ids: torch.Tensor,
                 cu_seqlens: torch.Tensor, max_seqlen: int, target_positions: torch.Tensor,
                 num_items_in_batch: Any = None, shared_prefix: int = 0, **_: Any) -> CausalLMOutput:
        p, training = self.p, self.model.training
        h, cos, sin = self._inputs(input_ids, position_ids)
        out = None
        if (self.graphs is not None and training and torch.is_grad_enabled() and not p.lm.is_gradient_checkpointing
                and not shared_prefix):  # the graphs capture the varlen layout only
            out = self.graphs.run(h, cos, sin, cu_seqlens, max_seqlen)  # None: this step runs eagerly
        if out is None:
            out = self._stack(h, cos, sin, cu_seqlens, max_seqlen, training, shared_prefix)
        return self._loss(out, shift_labels, target_positions, num_items_in_batch)

    def _inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        """The stack's inputs: embeddings [T, d] and rotary cos, sin [T, 1, D], in the compute dtype."""
        self._prepare(input_ids.device)
        h = F.embedding(input_ids.view(-1), self.p.embed.weight).to(self.dtype)
        cos, sin = self.p.rotary(h, position_ids.view(1, -1))
        return h, cos[0, :, None, :].to(self.dtype), sin[0, :, None, :].to(self.dtype)

    def _stack(self, h, cos, sin, cu_seqlens, max_seqlen: int, training: bool, prefix: int = 0) -> torch.Tensor:
        """Every decoder layer and the final norm: [T, d] embeddings -> [T, d] normed hidden states."""
        recompute = training and torch.is_grad_enabled() and self.p.lm.is_gradient_checkpointing
        for i in range(len(self.p.layers)):
            if recompute:
                h = checkpoint(self._layer, i, h, cos, sin, cu_seqlens, max_seqlen, training, prefix,
                               use_reentrant=False)
            else:
                h = self._layer(i, h, cos, sin, cu_seqlens, max_seqlen, training, prefix)
        return self._norm(h, self.p.norm)

    def _loss(self, h, shift_labels, target_positions, num_items_in_batch) -> CausalLMOutput:
        p = self.p
        targets = shift_labels.view(-1).index_select(0, target_positions)
        total = linear_cross_entropy(h.index_select(0, target_positions), p.head.weight.to(self.dtype), targets, self._ce)
        denom = num_items_in_batch if num_items_in_batch is not None else max(target_positions.numel(), 1)
        return CausalLMOutput(loss=total / denom)
