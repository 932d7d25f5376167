"""Binding the fused step to a model for training, or saying why not (one line, then the HF forward).

CUDA graphs of the stack (graphs.py) are on wherever the step runs on CUDA with only adapters training;
`training.cuda_graphs=off` turns them off (for A/B measurements and as an escape hatch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lm.loading import mixed_precision
from train.fast.attention import kernel_name
from train.fast.collate import PaddingFreeCollator
from train.fast.decoder import FusedStep
from train.fast.plan import Unsupported, compute_dtype, model_parts


@dataclass
class FastPath:
    step: FusedStep
    collator: PaddingFreeCollator
    summary: str


def _wanted(setting: str, on_cuda: bool) -> bool:
    return setting == "on" or (setting == "auto" and on_cuda)


def fast_path_wanted(setting: str) -> bool:
    """The fused step itself: auto = on CUDA and on a CPU (measured faster on both; docs/performance.md)."""
    return setting in ("on", "auto")


def shared_prefix_wanted(setting: str, on_cuda: bool) -> bool:
    """Shared-prefix batches: auto = on a CPU, where attention is SDPA per document anyway (collate.py)."""
    return setting == "on" or (setting == "auto" and not on_cuda)


def graphs_wanted(training: Any, on_cuda: bool) -> bool:
    """CUDA graphs of the stack: on CUDA unless training.cuda_graphs=off or gradient checkpointing recomputes layers."""
    return on_cuda and training.cuda_graphs == "auto" and not training.gradient_checkpointing


def install(model: torch.nn.Module, cfg: Any) -> FastPath | None:
    """Make `model.forward` the fused step when training.fast_path allows it and the model is covered."""
    t = cfg.training
    on_cuda = torch.cuda.is_available()
    if not fast_path_wanted(t.fast_path):
        return None
    try:
        if t.fsdp:
            raise Unsupported("FSDP (the fused step reads every layer's weights directly; FSDP shards them)")
        parts = model_parts(model, cfg.data.max_length)
    except Unsupported as e:
        print(f"note: fast path off: {e}; training uses the transformers forward", flush=True)
        return None
    dtype = compute_dtype(mixed_precision(cfg.model.dtype))
    compile_on = _wanted(t.compile, on_cuda)
    graphs_on = graphs_wanted(t, on_cuda)
    step = FusedStep(model, parts, dtype, compile=compile_on, graphs=graphs_on)
    share = shared_prefix_wanted(t.shared_prefix, on_cuda)
    model.forward = step  # the Trainer, accelerate's autocast wrapper and DDP all call model.forward
    device = torch.device("cuda" if on_cuda else "cpu")  # where the Trainer will put the model
    summary = (f"fast path: padding-free batches, {kernel_name(device)} attention, fused projections"
               f"{' + LoRA' if any(pr.lora for pr in parts.layers[0].groups[0]) else ''}, chunked output loss on "
               f"target tokens, {'shared prefix, ' if share else ''}{'torch.compile' if compile_on else 'eager'}{', CUDA graphs' if step.graphs else ''}, "
               f"{str(dtype).replace('torch.', '')}")
    print(summary, flush=True)
    return FastPath(step, PaddingFreeCollator(cfg.data.pad_to_multiple_of, share_prefix=share), summary)
