"""Retention: what the base model knew about the world, and how much of it the tuned model kept.

A bundled general set (`lm/general/retain.jsonl`: facts, arithmetic, instructions, refusals, chat;
written for the project) plus any `eval.retain` file of the user's, in one row format:

    {"prompt": "What is the capital of France?", "answers": ["Paris"], "category": "facts"}

A reply is correct when any answer appears in it as a whole word, case-insensitively. Every prompt
is asked without a system prompt (how a chat client calls a served adapter) and, when the training
data has one, with the training system prompt too. Base and tuned are scored alike; the tuned
model's drift is also measured as KL(tuned || base) per token on the base's own answers.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lm import result_cache
from lm.chat import IGNORE, encode_chat
from lm.data.formats import Example, read_rows
from lm.divergence import kl_div
from lm.errors import DataError
from lm.evaluation import generate_answers, next_token_batches

GENERAL = Path(__file__).parent / "general"
BUNDLED = GENERAL / "retain.jsonl"


@dataclass
class RetainItem:
    prompt: str
    answers: list[str]
    category: str
    where: str  # file:line


def load_items(path: Path | str, default_category: str = "user") -> list[RetainItem]:
    """Every row validated; DataError names the file, line and field of the first bad one."""
    items = []
    for i, row in read_rows(path):
        where = f"{path}:{i}"
        prompt, answers = row.get("prompt"), row.get("answers")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: prompt: must be a non-empty string")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: answers: must be a non-empty list of non-empty strings")
        items.append(RetainItem(prompt.strip(), [a.strip() for a in answers],
                                str(row.get("category") or default_category), where))
    return items


def retain_set(user_file: str | None, max_examples: int = 0) -> list[RetainItem]:
    """The bundled set (capped evenly across it at max_examples) plus all of the user's rows."""
    items = load_items(BUNDLED, "general")
    if 0 < max_examples < len(items):
        step = len(items) / max_examples
        items = [items[int(i * step)] for i in range(max_examples)]
    return items + (load_items(user_file) if user_file else [])


def is_correct(reply: str, answers: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in answers)


def training_system_prompt(examples: list[Example]) -> str | None:
    """The system prompt most training rows carry, if any: the second condition retention is asked under."""
    prompts = Counter(ex.messages[0]["content"] for ex in examples if ex.messages and ex.messages[0]["role"] == "system")
    return prompts.most_common(1)[0][0] if prompts else None


def conditions(system_prompt: str | None) -> dict[str, str | None]:
    return {"no_system": None, **({"train_system": system_prompt} if system_prompt else {})}


def ask(model, tokenizer, items: list[RetainItem], system: str | None, max_new_tokens: int,
        batch_size: int) -> list[str]:
    """Greedy replies to each item's prompt, with `system` as the system prompt when given."""
    sys_turn = [{"role": "system", "content": system}] if system else []
    rows = [Example(sys_turn + [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": ""}], it.where)
            for it in items]
    return generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)


def ask_all(model, tokenizer, items: list[RetainItem], conds: dict[str, str | None], max_new_tokens: int,
            batch_size: int) -> dict[str, list[str]]:
    return {name: ask(model, tokenizer, items, system, max_new_tokens, batch_size) for name, system in conds.items()}


def replies_key(model_sha: str, tokenizer, items: list[RetainItem], conds: dict[str, str | None],
                max_new_tokens: int) -> str:
    """What a model's greedy replies to the set depend on: its weights, template, the prompts and conditions."""
    return result_cache.input_key(model_sha, tokenizer.chat_template or "", max_new_tokens,
                                  sorted(conds.items(), key=str), [it.prompt for it in items])


def cached_replies(folder: Path, key: str, compute) -> dict[str, list[str]]:
    """The base's replies are the same for every run on that base: computed once (lm.result_cache)."""
    return result_cache.cached(folder, key, compute)


@torch.no_grad()
def drift_kl(tuned, base, tokenizer, items: list[RetainItem], base_replies: list[str],
             batch_size: int = 8) -> float | None:
    """Mean per-token KL(tuned || base) over the base's own replies (no system prompt): 0 = unchanged."""
    convs = [[{"role": "user", "content": it.prompt}, {"role": "assistant", "content": r}]
             for it, r in zip(items, base_replies) if r.strip()]
    if not convs:
        return None  # the base answered nothing: no tokens to compare on
    feats = [dict(zip(("input_ids", "labels"), encode_chat(tokenizer, c))) for c in convs]
    total, count = 0.0, 0
    pairs = zip(next_token_batches(tuned, feats, tokenizer.pad_token_id, batch_size),
                next_token_batches(base, feats, tokenizer.pad_token_id, batch_size))
    for (t_logits, labels), (b_logits, _) in pairs:
        mask = labels != IGNORE
        n = int(mask.sum())
        total += float(kl_div(t_logits[mask], b_logits.to(t_logits.device)[mask])) * n
        count += n
    return total / max(1, count)


def _accuracy(items: list[RetainItem], replies: list[str]) -> float:
    return sum(is_correct(r, it.answers) for it, r in zip(items, replies)) / max(1, len(items))


def report(items: list[RetainItem], base: dict[str, list[str]], tuned: dict[str, list[str]], kl: float | None,
           conds: dict[str, str | None]) -> dict[str, Any]:
    """Accuracy over every (prompt, condition), per condition and per category; base, tuned and the drop."""
    def acc(replies: dict[str, list[str]], keep=lambda it: True) -> float:
        pairs = [(it, r) for c in conds for it, r in zip(items, replies[c]) if keep(it)]
        return sum(is_correct(r, it.answers) for it, r in pairs) / max(1, len(pairs))

    cats = sorted({it.category for it in items})
    out = {"base": acc(base), "tuned": acc(tuned), "kl": kl, "rows": len(items), "conditions": {}, "by_category": {}}
    out["drop_points"] = 100 * (out["base"] - out["tuned"])
    for c, system in conds.items():
        out["conditions"][c] = {"system_prompt": system, "base": _accuracy(items, base[c]),
                                "tuned": _accuracy(items, tuned[c])}
    for cat in cats:
        out["by_category"][cat] = {"rows": sum(it.category == cat for it in items),
                                   "base": acc(base, lambda it: it.category == cat),
                                   "tuned": acc(tuned, lambda it: it.category == cat)}
    return out


def predictions(items: list[RetainItem], base: dict[str, list[str]], tuned: dict[str, list[str]]) -> list[dict]:
    """One row per (prompt, condition) for retention_predictions.jsonl: what each model answered."""
    return [{"where": it.where, "category": it.category, "condition": c, "prompt": it.prompt, "answers": it.answers,
             "base": base[c][i], "base_correct": is_correct(base[c][i], it.answers),
             "tuned": tuned[c][i], "tuned_correct": is_correct(tuned[c][i], it.answers)}
            for c in base for i, it in enumerate(items)]
