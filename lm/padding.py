"""Batching token rows: left padding for generation, right padding (with labels) for losses."""

from __future__ import annotations

from typing import Any

import torch

from lm.chat import IGNORE


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask (B, T): real tokens count 0, 1, 2...; padding gets 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of prompts left-padded to one length: generation
    continues from the right edge of every row; positions count real tokens only."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, n - len(p):] = 1
    return ids, mask, positions(mask)


class Collator:
    """Right-pads a batch (labels padded with IGNORE); packed rows keep their position_ids."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        pos = torch.zeros((len(batch), n), dtype=torch.long) if "position_ids" in batch[0] else None
        for i, b in enumerate(batch):
            L = len(b["input_ids"])
            ids[i, :L] = torch.tensor(b["input_ids"])
            labels[i, :L] = torch.tensor(b["labels"])
            mask[i, :L] = 1
            if pos is not None:
                pos[i, :L] = torch.tensor(b["position_ids"])
                pos[i, L:] = torch.arange(n - L)  # padding forms its own sequence, masked from the loss
        if pos is not None:
            # No attention_mask: transformers derives a block-diagonal causal mask from restarting position_ids.
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
