"""Scoring a model on a dataset: validation loss/perplexity and task metrics from greedy generation.

Training scores base vs tuned with it, and export's int8 quality gate scores fp32 vs int8 ONNX with
it (lm.onnx_runtime.OrtCausalLM answers the same calls), so both report the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lm import metrics
from lm.chat import IGNORE, encode_chat, encode_prompt
from lm.data.formats import Example
from lm.padding import Collator, left_pad


def next_token_batches(model, features: list[dict], pad_id: int, batch_size: int):
    """(logits (B, T-1, V) in fp32, labels (B, T-1)) per batch: each position's prediction of the next token."""
    collate, device = Collator(pad_id), next(model.parameters()).device
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[i:i + batch_size]).items()}
        labels = batch.pop("labels")[:, 1:]
        # Prompt-tuning models prepend virtual tokens: keep only the last T-1 positions.
        yield model(**batch).logits[:, :-1].float()[:, -labels.shape[1]:], labels


@torch.no_grad()
def loss_and_perplexity(model, features: list[dict], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean loss over assistant tokens, and its exp."""
    if not features:
        return {"loss": float("nan"), "perplexity": float("nan")}
    model.eval()
    total, count = 0.0, 0
    for logits, labels in next_token_batches(model, features, pad_id, batch_size):
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50))}


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[Example], max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to each example's prompt (every turn before its last assistant turn)."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, ex.messages) for ex in examples]
    pad_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    out: list[str] = [""] * len(prompts)
    # Sort by length so batches hold similar lengths (less padding); results go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask, _ = left_pad([prompts[i] for i in idx], pad_id)
        n = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_id)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, n:], skip_special_tokens=True).strip()
    return out


def task_scores(preds: list[str], examples: list[Example], labels: list[str]) -> dict[str, float]:
    refs = [ex.messages[-1]["content"] for ex in examples]
    if labels:
        return metrics.classification_scores(preds, [ex.label for ex in examples], labels)
    return metrics.generation_scores(preds, refs)


def score(model, tokenizer, val_features: list[dict], eval_examples: list[Example], labels: list[str],
          max_new_tokens: int, batch_size: int) -> tuple[dict[str, Any], list[str]]:
    res: dict[str, Any] = {}
    lp = loss_and_perplexity(model, val_features, tokenizer.pad_token_id, batch_size=max(1, batch_size // 2))
    res["val_loss"], res["val_perplexity"] = lp["loss"], lp["perplexity"]
    preds = generate_answers(model, tokenizer, eval_examples, max_new_tokens, batch_size) if eval_examples else []
    res.update(task_scores(preds, eval_examples, labels))
    res["eval_rows"] = len(eval_examples)
    return res, preds


HEADLINE = ("accuracy", "keyword_accuracy")


def headline_metric(res: dict[str, Any]) -> str:
    return next(k for k in HEADLINE if k in res)


@torch.no_grad()
def answer_logprobs(model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int = 8) -> list[float]:
    """Summed log-probability of each conversation's last assistant turn given the turns before it."""
    model.eval()
    feats = [dict(zip(("input_ids", "labels"), encode_chat(tokenizer, msgs))) for msgs in conversations]
    out: list[float] = []
    for logits, labels in next_token_batches(model, feats, tokenizer.pad_token_id, batch_size):
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += (logp * (labels != IGNORE)).sum(-1).tolist()
    return out


def preference_scores(model, tokenizer, pairs: list[Example]) -> dict[str, float]:
    """How often the model prefers chosen over rejected (summed answer log-prob), and the mean margin."""
    chosen = answer_logprobs(model, tokenizer, [ex.messages for ex in pairs])
    rejected = answer_logprobs(model, tokenizer, [ex.messages[:-1] + [{"role": "assistant", "content": ex.rejected}]
                                                  for ex in pairs])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "preference_margin": sum(margins) / len(margins)}
