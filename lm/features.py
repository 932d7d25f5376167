"""Dataset rows -> training/evaluation features (loss on assistant tokens only), truncation report, packing."""

from __future__ import annotations

from dataclasses import dataclass

from lm.chat import IGNORE, encode_chat
from lm.data.formats import Example


@dataclass
class TokenReport:
    rows: int = 0
    tokens: int = 0
    truncated_rows: int = 0
    truncated_tokens: int = 0
    rows_without_answer_after_truncation: int = 0


def tokenize(tokenizer, examples: list[Example], max_length: int) -> tuple[list[dict[str, list[int]]], TokenReport]:
    rep = TokenReport()
    out = []
    for ex in examples:
        ids, labels = encode_chat(tokenizer, ex.messages)
        if len(ids) > max_length:
            rep.truncated_rows += 1
            rep.truncated_tokens += len(ids) - max_length
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            rep.rows_without_answer_after_truncation += 1
            continue
        rep.rows += 1
        rep.tokens += len(ids)
        out.append({"input_ids": ids, "labels": labels})
    return out, rep


def pack(features: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy first-fit packing into blocks <= max_length; position_ids restart per row so rows don't mix."""
    blocks: list[dict[str, list[int]]] = []
    for f in sorted(features, key=lambda f: -len(f["input_ids"])):
        for b in blocks:
            if len(b["input_ids"]) + len(f["input_ids"]) <= max_length:
                break
        else:
            b = {"input_ids": [], "labels": [], "position_ids": []}
            blocks.append(b)
        b["input_ids"] += f["input_ids"]
        b["labels"] += f["labels"]
        b["position_ids"] += list(range(len(f["input_ids"])))
    return blocks
