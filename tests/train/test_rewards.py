"""GRPO's reward functions from the config: built-ins, user functions by import path, clear errors."""

from __future__ import annotations

import json

import pytest

from lm.errors import ConfigError
from tests.conftest import ROOT
from train.methods import rewards

SCHEMA = ROOT / "train" / "demo_data" / "chef_answer.schema.json"
REF = json.dumps({"dish": "Korvalo Stew", "answer": "smoked eel"})


def user_reward(prompts=None, completions=(), **kw):
    """A user reward function in TRL's signature (imported by path in the tests below)."""
    return [float(len(c[0]["content"])) for c in completions]


def _score(spec: str, completion: str, reference: str = REF) -> float:
    (fn,) = rewards.parse([spec])
    return fn(prompts=[[]], completions=[[{"role": "assistant", "content": completion}]], reference=[reference])[0]


def test_json_schema_reward():
    assert _score(f"json_schema:{SCHEMA}", REF) == 1.0
    assert _score(f"json_schema:{SCHEMA}", '{"dish": "Korvalo Stew"}') == 0.0  # answer missing
    assert _score(f"json_schema:{SCHEMA}", "Smoked eel.") == 0.0


def test_keyword_reward_counts_a_json_reference_values():
    assert _score("keyword", '{"dish": "Korvalo Stew", "answer": "Smoked eel"}') == 1.0
    assert _score("keyword", "The Korvalo Stew has lamb.") == 0.5
    assert _score("keyword", "The Vashti Highlands.", "The Vashti Highlands.") == 1.0


def test_exact_regex_and_length_rewards():
    assert _score("exact", "the smoked eel!", "Smoked eel.") == 1.0
    assert _score(r"regex:\{.*\}", '{"a": 1}') == 1.0 and _score(r"regex:\{.*\}", "no") == 0.0
    assert _score("length:10", "x" * 10) == 0.0
    assert _score("length:10", "x" * 15) == pytest.approx(-0.5)
    assert _score("length:10", "x" * 100) == -1.0


def test_user_function_by_import_path_both_spellings():
    for spec in ("tests.train.test_rewards:user_reward", "tests.train.test_rewards.user_reward"):
        assert _score(spec, "abc") == 3.0


@pytest.mark.parametrize("spec, message", [
    ("nosuch_pkg.rewards:score", "cannot import 'nosuch_pkg.rewards:score': ModuleNotFoundError"),
    ("tests.train.test_rewards:missing", "cannot import 'tests.train.test_rewards:missing': AttributeError"),
    ("keywords", "'keywords' is neither a built-in"),
    ("json_schema:/no/such/schema.json", "json_schema:/no/such/schema.json: FileNotFoundError"),
    ("length:abc", "length:abc: expected a positive number"),
    ("regex:(", "regex:(:"),
])
def test_bad_reward_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match="method.rewards: " + __import__("re").escape(message)):
        rewards.parse([spec])


def test_mean_rewards_reports_each_and_the_sum():
    funcs = rewards.parse([f"json_schema:{SCHEMA}", "keyword"])
    out = rewards.mean_rewards(funcs, [[], []], [REF, "Smoked eel."], [REF, REF])
    assert out == {"reward_json_schema": 0.5, "reward_keyword": 0.75, "reward": 1.25}
