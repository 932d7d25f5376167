"""Chat-template tokenisation with loss on assistant tokens only, truncation report, padding, packing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from train.data.formats import Example

IGNORE = -100  # label value the loss skips

# ChatML: used only when a tokenizer ships no chat template (e.g. a bare base model).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer a ChatML template and a pad token if missing. Returns True if a template was added."""
    added = False
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        added = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels; labels are IGNORE everywhere except assistant-turn tokens (incl. end-of-turn)."""
    ids = _ids(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:i], True))
        end = len(_ids(tokenizer, messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    if all(x == IGNORE for x in labels):
        raise ValueError("chat template is not prefix-stable: no assistant tokens found")
    return ids, labels


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt for generation: everything before the last assistant turn, plus the generation prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _ids(tokenizer, messages[:last], True)


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


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of prompts left-padded to one length: generation
    continues from the right edge of every row; positions count real tokens only."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


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
