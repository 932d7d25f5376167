"""The base model's held-out scores, reused across runs that would compute the same ones.

Every run with eval.compare_base scores the untouched base on its validation rows and eval set. With
the same base weights, data, evaluation settings and scoring code the result is the same: it is kept
in the cache (lm.result_cache, keyed by all of these) and read back, which saves a run on a CPU the
base's generations (about a minute for the demo). A method whose extra scores run the user's code
(GRPO's reward functions) is always rescored.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from lm import chat, evaluation, metrics, padding, result_cache
from lm.data.config import EvalConfig
from lm.data.formats import Example

Scores = tuple[dict[str, Any], list[str]]


@dataclasses.dataclass(frozen=True)
class ScoringInputs:
    """Everything the base's scores depend on besides the code that computes them."""

    base_sha: str
    chat_template: str
    dtype: str
    device: str
    val_features: list[tuple[list[int], list[int]]]
    examples: list[tuple[list[dict[str, str]], str | None, str | None]]  # messages, rejected, label
    labels: list[str]
    max_new_tokens: int
    batch_size: int
    method: str

    @classmethod
    def of(cls, base_sha: str, tok, val_feats: list[dict], examples: list[Example], labels: list[str],
           e: EvalConfig, method_name: str, dtype: torch.dtype, device: torch.device) -> "ScoringInputs":
        return cls(base_sha, tok.chat_template or "", str(dtype), device.type,
                   [(_ints(f["input_ids"]), _ints(f["labels"])) for f in val_feats],
                   [(ex.messages, ex.rejected, ex.label) for ex in examples], list(labels),
                   e.max_new_tokens, e.batch_size, method_name)

    def key(self, method) -> str:
        """Inputs plus the scoring code's source: lm's evaluation and the method's own module (extra_scores)."""
        code = result_cache.code_fingerprint(evaluation, metrics, chat, padding, sys.modules[type(method).__module__])
        return result_cache.input_key(dataclasses.asdict(self), code)


def _ints(xs) -> list[int]:
    return [int(x) for x in xs]


def reused_or_scored(folder: Path, inputs: ScoringInputs, method, score: Callable[[], Scores]) -> Scores:
    """score()'s (scores, predictions), or the same read back from an earlier run's identical scoring."""
    if not method.scores_reusable:
        return score()
    res, preds = result_cache.cached(folder, inputs.key(method), lambda: list(score()))
    return res, preds
