"""Replay: the base model's own answers to general prompts, mixed into training so it stays a chat model.

No outside data: the prompts are the bundled general ones (`lm/general/replay_prompts.jsonl`, disjoint
from the retention set that scores the run) plus the user's `data.replay_prompts`. The base answers
each once, greedily and without a system prompt; the answers are cached under
$TUNESTACK_CACHE/replay/<key>, where the key covers the base weights, the prompts, the chat template
and the generation length, so a different base regenerates them. meta.json holds the checksum,
verified on every reuse. `data.replay` x (training rows) of them are drawn with the run's seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from artifacts import atomic_dir, sha256_file
from lm.data.config import DataConfig
from lm.data.formats import Example, read_rows
from lm.errors import ConfigError, DataError
from lm.evaluation import generate_answers
from lm.retention import GENERAL

BUNDLED_PROMPTS = GENERAL / "replay_prompts.jsonl"
ROWS = "rows.jsonl"


@dataclass
class Prompt:
    text: str
    where: str


def load_prompts(path: Path) -> list[Prompt]:
    """Rows with a non-empty `prompt` (other fields ignored); DataError names the file, line and field."""
    out = []
    for i, row in read_rows(path):
        text = row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{i}: prompt: must be a non-empty string")
        out.append(Prompt(text.strip(), f"{path}:{i}"))
    return out


def prompt_pool(cfg: DataConfig) -> list[Prompt]:
    return load_prompts(BUNDLED_PROMPTS) + (load_prompts(Path(cfg.replay_prompts)) if cfg.replay_prompts else [])


def cache_key(base_sha: str, prompts: list[Prompt], chat_template: str, max_new_tokens: int) -> str:
    parts = [base_sha, chat_template, max_new_tokens, [p.text for p in prompts]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def read_cache(folder: Path) -> list[dict] | None:
    """The cached rows, or None when absent; a checksum mismatch is an error, never silently reused."""
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    digest = json.loads(meta.read_text())["files"][ROWS]
    if sha256_file(folder / ROWS) != digest:
        raise ConfigError(f"{folder / ROWS}: replay cache checksum mismatch; delete {folder} to regenerate it")
    return [json.loads(line) for line in (folder / ROWS).read_text(encoding="utf-8").splitlines()]


def write_cache(folder: Path, rows: list[dict], meta: dict[str, Any]) -> None:
    with atomic_dir(folder, replace=True) as tmp:
        (tmp / ROWS).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        meta = {**meta, "files": {ROWS: sha256_file(tmp / ROWS)}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int, batch_size: int = 64) -> list[dict]:
    rows = [Example([{"role": "user", "content": p.text}, {"role": "assistant", "content": ""}], p.where)
            for p in prompts]
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    return [{"prompt": p.text, "answer": a, "where": p.where} for p, a in zip(prompts, answers)]


@dataclass
class Replay:
    examples: list[Example]
    report: dict[str, Any]


def build(cfg: DataConfig, n_train: int, seed: int, tokenizer, base_sha: str, cache_root: Path,
          load_base: Callable[[], Any], system_prompt: str | None = None, batch_size: int = 64) -> Replay:
    """`data.replay` x n_train replay rows: cached base answers (generated now on a miss), drawn with the seed.

    Every other row carries the training data's system prompt (when it has one), so the tuned model
    keeps answering general questions both as it was trained and as a bare chat client asks them.
    """
    prompts = prompt_pool(cfg)
    key = cache_key(base_sha, prompts, tokenizer.chat_template or "", cfg.replay_max_new_tokens)
    folder = cache_root / "replay" / key[:32]
    rows, cached = read_cache(folder), True
    if rows is None:
        cached = False
        rows = generate(load_base(), tokenizer, prompts, cfg.replay_max_new_tokens, batch_size)
        write_cache(folder, rows, {"base_sha256": base_sha, "prompts": len(prompts),
                                   "max_new_tokens": cfg.replay_max_new_tokens, "key": key})
    usable = [r for r in rows if r["answer"].strip()]
    want = int(round(cfg.replay * n_train))
    chosen = random.Random(seed).sample(usable, min(want, len(usable)))
    sys_turn = [{"role": "system", "content": system_prompt}] if system_prompt else []
    examples = [Example((sys_turn if i % 2 == 0 else []) + [{"role": "user", "content": r["prompt"]},
                                                              {"role": "assistant", "content": r["answer"]}],
                        f"replay:{r['where']}") for i, r in enumerate(chosen)]
    report = {"fraction": cfg.replay, "requested_rows": want, "rows": len(examples), "pool": len(prompts),
              "empty_answers_dropped": len(rows) - len(usable), "cache": str(folder), "cache_reused": cached,
              "rows_sha256": json.loads((folder / "meta.json").read_text())["files"][ROWS],
              "user_prompts": cfg.replay_prompts, "with_training_system_prompt": (len(examples) + 1) // 2 if sys_turn else 0}
    return Replay(examples, report)
