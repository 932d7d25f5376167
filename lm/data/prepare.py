"""Clean, check labels and split: everything between reading rows and tokenising."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from artifacts import sha256_file
from lm.data.config import DataConfig
from lm.data.formats import Example, load_examples
from lm.errors import DataError


@dataclass
class CleanReport:
    rows_read: int = 0
    empty_turns_dropped: int = 0
    empty_rows_dropped: int = 0
    duplicates_dropped: int = 0
    rows_kept: int = 0


def clean(examples: list[Example], system_prompt: str | None = None) -> tuple[list[Example], CleanReport]:
    """Strip whitespace, drop empty turns (and rows left with no answer), drop exact duplicates."""
    rep = CleanReport(rows_read=len(examples))
    seen: set[str] = set()
    out: list[Example] = []
    for ex in examples:
        msgs = []
        for m in ex.messages:
            content = m["content"].strip()
            if not content:
                rep.empty_turns_dropped += 1
                continue
            msgs.append({"role": m["role"], "content": content})
        if system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        if not msgs or msgs[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in msgs):
            rep.empty_rows_dropped += 1
            continue
        rejected = ex.rejected.strip() if ex.rejected is not None else None
        if rejected == "":
            rep.empty_rows_dropped += 1
            continue
        key = json.dumps([msgs, rejected], sort_keys=True)
        if key in seen:
            rep.duplicates_dropped += 1
            continue
        seen.add(key)
        out.append(Example(msgs, ex.where, ex.label, rejected))
    rep.rows_kept = len(out)
    return out, rep


def classification_prompt(labels: list[str]) -> str:
    return "Classify the text. Answer with exactly one label: " + ", ".join(labels) + "."


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    eval: list[Example]
    format: str
    labels: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)  # per split: path, sha256, cleaning counts


def _check_labels(examples: list[Example], labels: list[str]) -> None:
    allowed = set(labels)
    for ex in examples:
        if ex.label not in allowed:
            field_name = ex.where  # where = file:line
            raise DataError(f"{field_name}: label: unknown label {ex.label!r}; known: {', '.join(map(repr, labels))}")


def prepare(cfg: DataConfig, seed: int) -> Splits:
    """Validate every file completely before returning; raises DataError on the first bad row."""
    train_raw, fmt = load_examples(cfg.train, cfg.format, cfg.text_field, cfg.label_field)
    val_raw = eval_raw = None
    if cfg.validation:
        val_raw, _ = load_examples(cfg.validation, fmt, cfg.text_field, cfg.label_field)
    if cfg.eval:
        eval_raw, _ = load_examples(cfg.eval, fmt, cfg.text_field, cfg.label_field)

    labels: list[str] = []
    if fmt == "classification":
        labels = list(cfg.labels) or sorted({ex.label for ex in train_raw})
        for part in (train_raw, val_raw or [], eval_raw or []):
            _check_labels(part, labels)
        prompt = classification_prompt(labels)
        for part in (train_raw, val_raw or [], eval_raw or []):
            for ex in part:
                ex.messages.insert(0, {"role": "system", "content": prompt})

    report: dict = {"format": fmt}
    train, rep = clean(train_raw, cfg.system_prompt)
    report["train"] = {"path": str(cfg.train), "sha256": sha256_file(cfg.train), **rep.__dict__}
    if not train:
        raise DataError(f"{cfg.train}:1: -: no usable rows after cleaning")

    if val_raw is not None:
        validation, vrep = clean(val_raw, cfg.system_prompt)
        report["validation"] = {"path": str(cfg.validation), "sha256": sha256_file(cfg.validation), **vrep.__dict__}
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = int(round(len(train) * cfg.validation_fraction))
        if cfg.validation_fraction > 0:
            n_val = max(1, min(n_val, len(train) - 1))
        val_idx = set(order[:n_val])
        if n_val and len(train) < 2:
            raise DataError(f"{cfg.train}:1: -: one usable row: nothing left to train on after splitting off "
                            f"validation_fraction {cfg.validation_fraction}; add rows or set data.validation")
        validation = [ex for i, ex in enumerate(train) if i in val_idx]
        train = [ex for i, ex in enumerate(train) if i not in val_idx]
        report["validation"] = {"split_from": "train", "fraction": cfg.validation_fraction, "seed": seed,
                                "rows_kept": len(validation)}
    report["train"]["rows_used"] = len(train)

    if eval_raw is not None:
        evalset, erep = clean(eval_raw, cfg.system_prompt)
        report["eval"] = {"path": str(cfg.eval), "sha256": sha256_file(cfg.eval), **erep.__dict__}
    else:
        evalset = validation
        report["eval"] = {"same_as": "validation", "rows_kept": len(validation)}
    return Splits(train, validation, evalset, fmt, labels, report)
