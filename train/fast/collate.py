"""Padding-free batches: a batch's rows laid end to end as one sequence, with document boundaries.

A padded batch of 8 chat rows drawn from 50 to 2,000 tokens is about 45 % padding, and every layer
computes on it. Here the rows are concatenated instead: `position_ids` restart at each document,
`cu_seqlens` marks the boundaries for the varlen attention kernel, and `shift_labels` holds each
position's next-token target (IGNORE at the last token of a document, so no document predicts the
next one), and `target_positions` lists the positions that have a target, so only those reach
the output layer. Rows already packed by `data.packing` are split at their position resets, so both kinds
of rows give the same batch.
"""

from __future__ import annotations

from typing import Any

import torch

from lm.chat import IGNORE


def _documents(row: dict[str, Any]) -> list[tuple[int, int]]:
    """(start, end) of each document in a row: the whole row, or its pieces where position_ids restart."""
    n = len(row["input_ids"])
    pos = row.get("position_ids")
    if pos is None:
        return [(0, n)]
    starts = [i for i, p in enumerate(pos) if p == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    return list(zip(starts, starts[1:] + [n]))


class PaddingFreeCollator:
    def __init__(self, pad_to_multiple_of: int | None = None):
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        ids: list[int] = []
        labels: list[int] = []
        targets: list[int] = []
        pos: list[int] = []
        cu = [0]
        for row in batch:
            for s, e in _documents(row):
                ids += row["input_ids"][s:e]
                lab = row["labels"][s:e]
                labels += [IGNORE] + lab[1:]  # a document's first token is never a target
                targets += lab[1:] + [IGNORE]
                pos += range(e - s)
                cu.append(len(ids))
        pad = (-len(ids)) % self.multiple if self.multiple else 0
        if pad:  # padding forms its own document with no targets
            ids += [ids[-1]] * pad
            labels += [IGNORE] * pad
            targets += [IGNORE] * pad
            pos += range(pad)
            cu.append(len(ids))
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "shift_labels": torch.tensor([targets], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "target_positions": torch.tensor([i for i, t in enumerate(targets) if t != IGNORE], dtype=torch.long),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "max_seqlen": max(lengths),
        }
