"""Padding-free batches: a batch's rows laid end to end as one sequence, with document boundaries.

A padded batch of 8 chat rows drawn from 50 to 2,000 tokens is about 45 % padding, and every layer
computes on it. Here the rows are concatenated instead: `position_ids` restart at each document,
`cu_seqlens` marks the boundaries for the varlen attention kernel, and `shift_labels` holds each
position's next-token target (IGNORE at the last token of a document, so no document predicts the
next one), and `target_positions` lists the positions that have a target, so only those reach
the output layer. Rows already packed by `data.packing` are split at their position resets, so both kinds
of rows give the same batch.

Shared prefix (`share_prefix`): rows that open with the same tokens (a dataset's fixed system prompt,
and the chat template around it) compute those tokens once per batch. The prefix becomes the
sequence's first document, every other document attends to it and then to itself, and its
positions run on from the prefix's length, so each row sees exactly the context it had alone. The
prefix ends before any row's first target, so no target moves. On the demo's menu rows the prefix
is 27 of 51 tokens: a batch of 8 computes 219 tokens instead of 408.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


MIN_SHARED = 8  # tokens: a shorter common prefix saves less than its extra attention call costs


def shared_prefix(batch: list[dict[str, Any]]) -> int:
    """Tokens every row of `batch` opens with and that no target needs; 0 when sharing does not pay.

    Only single-document rows share (packed rows already fill their length). The prefix stops one token
    before the earliest target of any row: position P-1 predicts token P, which must carry no loss."""
    if len(batch) < 2 or any(len(_documents(r)) > 1 for r in batch):
        return 0
    first = batch[0]["input_ids"]
    n = min(len(r["input_ids"]) for r in batch) - 1  # every row keeps at least one token of its own
    for r in batch[1:]:
        ids = r["input_ids"]
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    for r in batch:
        n = min(n, next((i for i, t in enumerate(r["labels"]) if t != IGNORE), len(r["labels"])) - 1)
    return n if n >= MIN_SHARED else 0


@dataclass
class _Sequence:
    """The batch's one sequence, built a document at a time."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    cu: list[int] = field(default_factory=lambda: [0])

    def add(self, ids: list[int], labels: list[int], targets: list[int], pos: range) -> None:
        self.ids += ids
        self.labels += labels
        self.targets += targets
        self.pos += pos
        self.cu.append(len(self.ids))

    def add_untargeted(self, ids: list[int]) -> None:
        """A document no token of which is a target (the shared prefix, the padding)."""
        self.add(ids, [IGNORE] * len(ids), [IGNORE] * len(ids), range(len(ids)))


class PaddingFreeCollator:
    def __init__(self, pad_to_multiple_of: int | None = None, share_prefix: bool = False):
        self.multiple = pad_to_multiple_of
        self.share = share_prefix

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        seq = _Sequence()
        prefix = shared_prefix(batch) if self.share else 0
        if prefix:  # the first document: the prefix once (shared_prefix checked that it holds no target)
            seq.add_untargeted(batch[0]["input_ids"][:prefix])
        for row in batch:
            for start, e in _documents(row):
                s = max(start, prefix)  # with a prefix, rows are single documents: their own tokens follow it
                lab = row["labels"][s:e]
                # a document's first token is never a target (after a prefix, shared_prefix made sure of it)
                seq.add(row["input_ids"][s:e], [IGNORE] + lab[1:], lab[1:] + [IGNORE], range(s - start, e - start))
        pad = (-len(seq.ids)) % self.multiple if self.multiple else 0
        if pad:  # padding forms its own document with no targets
            seq.add_untargeted([seq.ids[-1]] * pad)
        cu = seq.cu
        return {
            "input_ids": torch.tensor([seq.ids], dtype=torch.long),
            "labels": torch.tensor([seq.labels], dtype=torch.long),
            "shift_labels": torch.tensor([seq.targets], dtype=torch.long),
            "position_ids": torch.tensor([seq.pos], dtype=torch.long),
            "target_positions": torch.tensor([i for i, t in enumerate(seq.targets) if t != IGNORE], dtype=torch.long),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "max_seqlen": max(b - a for a, b in zip(cu, cu[1:])),
            "shared_prefix": prefix,  # cu_seqlens' first document is seen by every other one
        }
