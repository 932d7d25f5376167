"""Reward functions for RL (`method.rewards`), built-in or the user's own, summed per completion.

Built-ins score a completion's text against the row's reference (its last assistant turn):
  json_schema:PATH  1 if the completion is JSON valid against the schema file, else 0
  regex:PATTERN     1 if the whole completion matches the regular expression, else 0
  exact             1 if it equals the reference (normalised: case, punctuation, articles)
  keyword           the share of the reference's facts present: a JSON reference's values, else its text
  length:N          0 up to N characters, then down to -1 at 2N (a length penalty)
Anything else is a user function by import path, `package.module:function` or `package.module.function`,
called like TRL's reward functions: f(prompts=..., completions=..., reference=..., **kw) -> list[float].
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable

from lm.errors import ConfigError
from lm.metrics import exact_match, keyword_match

TextReward = Callable[[str, str], float]  # (completion, reference) -> reward


def _json_schema(arg: str) -> TextReward:
    import jsonschema

    path = Path(arg)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        validator = jsonschema.Draft202012Validator(schema)
    except (OSError, ValueError, jsonschema.SchemaError) as e:
        raise ConfigError(f"config: method.rewards: json_schema:{arg}: {type(e).__name__}: {e}".splitlines()[0]) from None

    def score(completion: str, reference: str) -> float:
        try:
            return float(validator.is_valid(json.loads(completion.strip())))
        except ValueError:
            return 0.0
    return score


def _regex(arg: str) -> TextReward:
    try:
        pattern = re.compile(arg, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"config: method.rewards: regex:{arg}: {e}") from None
    return lambda completion, reference: float(pattern.fullmatch(completion.strip()) is not None)


def _facts(reference: str) -> list[str]:
    try:
        obj = json.loads(reference)
    except ValueError:
        return [reference]
    return [str(v) for v in obj.values()] if isinstance(obj, dict) and obj else [reference]


def keyword(completion: str, reference: str) -> float:
    facts = _facts(reference)
    return sum(keyword_match(completion, f) for f in facts) / len(facts)


def _length(arg: str) -> TextReward:
    n = int(arg) if arg.isdigit() else 0
    if n <= 0:
        raise ConfigError(f"config: method.rewards: length:{arg}: expected a positive number of characters")
    return lambda completion, reference: -min(1.0, max(0, len(completion) - n) / n)


BUILTINS: dict[str, Callable[[str], TextReward]] = {
    "json_schema": _json_schema, "regex": _regex, "length": _length,
    "exact": lambda _: exact_match, "keyword": lambda _: keyword,
}


def _text(completion: Any) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    return completion[0]["content"] if isinstance(completion, list) else str(completion)


def _as_trl(name: str, fn: TextReward) -> Callable[..., list[float]]:
    def reward(prompts=None, completions=(), reference=None, **kw) -> list[float]:
        refs = reference if reference is not None else [""] * len(completions)
        return [fn(_text(c), r) for c, r in zip(completions, refs)]
    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def _import(spec: str) -> Callable[..., list[float]]:
    module, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"config: method.rewards: cannot import {spec!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not callable(fn):
        raise ConfigError(f"config: method.rewards: {spec!r} is not callable")
    return fn


def parse(specs: list[str]) -> list[Callable[..., list[float]]]:
    """The TRL reward functions of method.rewards; a ConfigError names the one that fails."""
    if not specs:
        raise ConfigError("config: method.rewards: grpo needs at least one reward function")
    out = []
    for spec in specs:
        name, _, arg = spec.partition(":")
        if name in BUILTINS:
            out.append(_as_trl(name, BUILTINS[name](arg)))
        elif "." in spec:
            out.append(_import(spec))
        else:
            raise ConfigError(f"config: method.rewards: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) "
                              "nor an import path like mypkg.rewards:score")
    return out


def mean_rewards(funcs, prompts: list, completions: list[str], references: list[str]) -> dict[str, float]:
    """Each reward's mean and their summed mean on greedy answers (the held-out evaluation)."""
    conv = [[{"role": "assistant", "content": c}] for c in completions]
    out, total = {}, [0.0] * len(completions)
    for f in funcs:
        vals = [float(v) for v in f(prompts=prompts, completions=conv, reference=references)]
        out[f"reward_{f.__name__}"] = sum(vals) / max(1, len(vals))
        total = [t + v for t, v in zip(total, vals)]
    out["reward"] = sum(total) / max(1, len(total))
    return out
