"""CUDA graphs of the fused step's decoder stack, one per bucket of token count (LoRA on CUDA).

A LoRA step of a small model is bound by the host: ~1,600 launches a step (matrix products, Triton
kernels, the attention op) cost more host time than the GPU needs to run them. A CUDA graph replays
the whole stack's forward (every layer and the final norm) and its backward (the adapters' gradients)
with two launches. A graph fixes every shape and address, so:
- the step's tokens are padded up to a bucket (`TOKEN_STEP`); the padding is a document of its own
  (attention never crosses documents) with zero inputs and zero output gradient, so the real rows'
  outputs and the adapters' gradients are those of the unpadded step;
- the document boundaries (`cu_seqlens`) get a fixed number of slots, the unused ones empty
  documents, and the attention kernel a fixed maximum document length (a power of two);
- the inputs are copied into static buffers, the outputs read from static buffers: valid until the
  next replay of any bucket, which is the next step (all buckets share one memory pool);
- the adapters' gradients come out of the backward graph as one flat buffer, copied once a step, so
  gradient accumulation adds into tensors of its own.

Only the frozen-base case is graphed (full fine-tuning is GPU-bound, and its gradients would be a
second copy of the model). A capture that fails switches graphs off for the run with one log line,
and the step runs as before.

Known limit (seen on an H200, torch 2.11): a capture fails if the previous step's autograd graph is
still alive (a caller holding its loss tensor): the adapters' gradient nodes then belong to the
default stream and the capture's backward waits on it. The Trainer detaches its loss, so its runs
capture cleanly. After such a failure torch's CUDA generator stayed in capture mode and the next
random op raised, so a caller that keeps its loss should pass `graphs=False`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

TOKEN_STEP = 1024  # padding <= 1,023 tokens (~6 % of an 8k-token step); 8 rows of 50-2,000 tokens fill ~8 buckets
MIN_DOC_SLOTS = 16  # document slots, a power of two: 8 rows + the padding's document fit the smallest
MIN_SEQLEN = 512  # the attention kernel's maximum document length, a power of two: at most 2 graphs for 512-2,048
MAX_GRAPHS = 16  # each bucket keeps its static inputs, output and gradients (~0.1 GiB at 1.5B); beyond, eager

Stack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Bucket:
    tokens: int  # padded token count
    docs: int  # document slots (cu_seqlens has docs + 1 entries)
    max_seqlen: int  # the attention kernel's bound on one document's length


def bucket_for(tokens: int, docs: int, max_seqlen: int, step: int = TOKEN_STEP) -> Bucket:
    """The bucket of a step of `tokens` real tokens in `docs` documents, the longest `max_seqlen` long."""
    padded = -(-tokens // step) * step
    slots = _pow2(max(docs + 1, MIN_DOC_SLOTS))  # + 1: the padding's own document
    return Bucket(padded, slots, _pow2(max(max_seqlen, padded - tokens, MIN_SEQLEN)))


@dataclass
class Inputs:
    """A step's stack inputs: hidden states [T, d], rotary cos/sin [T, 1, D], cu_seqlens [n + 1]."""
    h: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cu: torch.Tensor

    @staticmethod
    def empty(b: Bucket, like: "Inputs") -> "Inputs":
        def z(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros((b.tokens, *t.shape[1:]), dtype=t.dtype, device=t.device)
        return Inputs(z(like.h), z(like.cos), z(like.sin), torch.full((b.docs + 1,), b.tokens, dtype=like.cu.dtype,
                                                                       device=like.cu.device))

    def fill_from(self, x: "Inputs") -> None:
        """Copy a step's inputs in; the rows past them are zeroed (the padding document)."""
        t, n = x.h.shape[0], x.cu.shape[0]
        for dst, src in ((self.h, x.h), (self.cos, x.cos), (self.sin, x.sin)):
            dst[:t].copy_(src)
            dst[t:].zero_()
        self.cu[:n].copy_(x.cu)
        self.cu[n:].fill_(self.h.shape[0])


def padded_stack(fn: Stack, x: Inputs, b: Bucket) -> torch.Tensor:
    """The stack on `x` padded to bucket `b`, its output cut back to the real rows (the graph's arithmetic)."""
    s = Inputs.empty(b, x)
    s.fill_from(x)
    return fn(s.h, s.cos, s.sin, s.cu, b.max_seqlen)[:x.h.shape[0]]


@dataclass
class _Captured:
    bucket: Bucket
    inputs: Inputs
    grad_out: torch.Tensor
    fwd: torch.cuda.CUDAGraph = field(default_factory=torch.cuda.CUDAGraph)
    bwd: torch.cuda.CUDAGraph = field(default_factory=torch.cuda.CUDAGraph)
    out: torch.Tensor | None = None
    flat_grads: torch.Tensor | None = None


class _Replay(torch.autograd.Function):
    """Forward: replay the bucket's forward graph. Backward: its backward graph; the parameters' gradients."""

    @staticmethod
    def forward(ctx, c: _Captured, params_like: list, *params: torch.Tensor) -> torch.Tensor:
        c.fwd.replay()
        ctx.c, ctx.params_like = c, params_like
        return c.out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c = ctx.c
        c.grad_out.copy_(grad)
        c.bwd.replay()
        grads = _unflatten_dense_tensors(c.flat_grads.clone(), ctx.params_like)
        return (None, None, *grads)


class StackGraphs:
    """Replays the stack's forward and backward per bucket; `run` returns None where the caller runs it eagerly."""

    def __init__(self, fn: Stack, params: list[torch.Tensor], max_graphs: int = MAX_GRAPHS):
        self.fn, self.params, self.max_graphs = fn, params, max_graphs
        self.graphs: dict[Bucket, _Captured] = {}
        self.off: str | None = None  # why graphs were given up, once per run
        self._ptrs = [p.data_ptr() for p in params]
        self._pool = self._stream = None
        self.capture_s = 0.0  # host seconds spent capturing (warm-up included), for the benchmarks

    def give_up(self, why: str) -> None:
        if self.off is None:
            self.off = why
            print(f"note: CUDA graphs of the fused step off ({why[:200]}); the step runs eagerly", flush=True)
        self.graphs.clear()

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor,
            max_seqlen: int) -> torch.Tensor | None:
        if self.off is not None or not h.is_cuda:
            return None
        if not self.graphs and _distributed():  # checked at the first step: torchrun starts the group after install
            self.give_up(_distributed())
            return None
        if [p.data_ptr() for p in self.params] != self._ptrs:  # the optimiser or a load replaced a parameter
            self.graphs.clear()
            self._ptrs = [p.data_ptr() for p in self.params]
        x = Inputs(h, cos, sin, cu)
        b = bucket_for(h.shape[0], cu.shape[0] - 1, max_seqlen)
        c = self.graphs.get(b)
        if c is None:
            if len(self.graphs) >= self.max_graphs:
                return None
            t0 = time.perf_counter()
            try:
                c = self._capture(b, x)
                self.capture_s += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - a capture the driver or an op refuses costs speed, not the run
                self.give_up(f"capture failed: {type(e).__name__}: {e}")
                return None
            self.graphs[b] = c
        c.inputs.fill_from(x)
        return _Replay.apply(c, self.params, *self.params)[:h.shape[0]]

    def _capture(self, b: Bucket, x: Inputs) -> _Captured:
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        c = _Captured(b, Inputs.empty(b, x), torch.zeros((b.tokens, x.h.shape[1]), dtype=x.h.dtype, device=x.h.device))
        c.inputs.fill_from(x)  # the warm-up computes on real values (padding rows zero)
        s = self._stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on the capture stream: compiles, autotunes, cuBLAS workspace
            out = self.fn(c.inputs.h, c.inputs.cos, c.inputs.sin, c.inputs.cu, b.max_seqlen)
            torch.autograd.grad(out, self.params, grad_outputs=c.grad_out, materialize_grads=True)
            del out
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(c.fwd, pool=self._pool, stream=s, capture_error_mode="thread_local"):
            out = self.fn(c.inputs.h, c.inputs.cos, c.inputs.sin, c.inputs.cu, b.max_seqlen)
        with torch.cuda.graph(c.bwd, pool=self._pool, stream=s, capture_error_mode="thread_local"):
            grads = torch.autograd.grad(out, self.params, grad_outputs=c.grad_out, materialize_grads=True)
            c.flat_grads = _flatten_dense_tensors(grads)
            del grads
        c.out = out.detach()
        return c


def graphable(params: list[torch.Tensor], frozen: list[torch.Tensor]) -> str | None:
    """Why the stack cannot be graphed with these trainable and frozen tensors, or None if it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not params:
        return "no trainable adapter"
    if any(t.requires_grad for t in frozen):
        return "full fine-tuning (the base weights train)"
    if len({p.dtype for p in params}) > 1 or not all(p.requires_grad for p in params):
        return "adapters of mixed dtypes or frozen adapters"
    return _distributed()


def _distributed() -> str | None:
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return "several processes (graphs not measured under DDP)"
    return None
