"""Cross-entropy of the output layer without materialising the logits of the whole batch.

The vocab-sized logits are the largest tensor of a small model's step (8k tokens x 152k vocab in
fp32 is 5 GiB, and autograd keeps it and its gradient). Here they exist one chunk of rows at a time:
the forward computes each chunk's loss and, at once, its gradients with respect to the hidden states
and the output weight (softmax - one-hot), so nothing vocab-sized is kept for the backward. This is
the scheme of Liger Kernel's fused linear cross-entropy, written with PyTorch ops so that it runs the
same on CPU and GPU (the matrix products, which are nearly all the cost, go to cuBLAS either way).

Only rows with a target are passed in: prompt tokens (the loss ignores them) never reach the output layer.
"""

from __future__ import annotations

from typing import Callable

import torch

ChunkFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
ELEMENTS_PER_CHUNK = 1 << 26  # rows x vocab per chunk: 256 MiB of fp32 logits, large enough to keep cuBLAS busy


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of one chunk and d(sum NLL)/d(logits) = softmax - one-hot, in the logits' dtype."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    nll = (lse - z.gather(1, targets[:, None]).squeeze(1)).sum()
    grad = torch.exp(z - lse[:, None])
    grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    return nll, grad.to(logits.dtype)


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk_fn: ChunkFn) -> torch.Tensor:
        rows = max(64, ELEMENTS_PER_CHUNK // w.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], rows):
            hc = h[s:s + rows]
            nll, g = chunk_fn(hc @ w.t(), targets[s:s + rows])
            total += nll
            if gh is not None:
                torch.mm(g, w, out=gh[s:s + rows])
            if gw is not None:
                gw += (g.t() @ hc).float()
        ctx.save_for_backward(gh, gw.to(w.dtype) if gw is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gh, gw = ctx.saved_tensors
        return (gh * grad_out.to(gh.dtype) if gh is not None else None,
                gw * grad_out.to(gw.dtype) if gw is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                         chunk_fn: ChunkFn = ce_chunk) -> torch.Tensor:
    """sum_i -log softmax(h_i @ w.T)[targets_i], h [N, d], w [V, d], targets [N] (no ignored rows)."""
    if h.shape[0] == 0:
        return (h.sum() + w.sum()) * 0.0  # keeps the graph (and DDP's reducer) whole on an all-prompt batch
    return _LinearCE.apply(h, w, targets, chunk_fn)
