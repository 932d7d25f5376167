"""The base's held-out scores are computed once per base, data, settings and scoring code, then reused."""

from __future__ import annotations

import json

import torch

from lm.data.config import EvalConfig
from lm.data.formats import Example
from tests.conftest import tiny_overrides
from train import base_scores
from train.config import load_config
from train.methods import get_method
from train.recipe import FineTuneRecipe, run


class _Tok:
    chat_template = "{{ messages }}"


def _inputs(**change) -> base_scores.ScoringInputs:
    ex = [Example([{"role": "user", "content": "Price of the tart?"}, {"role": "assistant", "content": "$9"}], "e:1")]
    args = dict(base_sha="a" * 64, tok=_Tok(), val_feats=[{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}],
                examples=ex, labels=[], e=EvalConfig(), method_name="lora", dtype=torch.float32,
                device=torch.device("cpu"))
    args.update(change)
    return base_scores.ScoringInputs.of(**args)


def test_the_key_changes_with_every_input():
    lora = get_method("lora")
    k = _inputs().key(lora)
    assert k == _inputs().key(lora)
    other_ex = [Example([{"role": "user", "content": "Price of the pie?"}, {"role": "assistant", "content": "$9"}], "e:1")]
    for change in ({"base_sha": "b" * 64}, {"examples": other_ex}, {"dtype": torch.bfloat16},
                   {"e": EvalConfig(max_new_tokens=8)}, {"val_feats": [{"input_ids": [1, 2, 4], "labels": [-100, 2, 4]}]},
                   {"device": torch.device("meta")}):
        assert _inputs(**change).key(lora) != k, change
    assert _inputs().key(get_method("dpo")) != k  # another method's module: its extra scores


def test_scores_are_reused_unless_the_method_runs_user_code(tmp_path):
    calls = []

    def score():
        calls.append(1)
        return {"keyword_accuracy": 0.25}, ["$9"]

    lora, grpo = get_method("lora"), get_method("grpo")
    assert base_scores.reused_or_scored(tmp_path, _inputs(), lora, score) == ({"keyword_accuracy": 0.25}, ["$9"])
    assert base_scores.reused_or_scored(tmp_path, _inputs(), lora, score) == ({"keyword_accuracy": 0.25}, ["$9"])
    assert calls == [1]
    base_scores.reused_or_scored(tmp_path, _inputs(), grpo, score)
    base_scores.reused_or_scored(tmp_path, _inputs(), grpo, score)
    assert calls == [1, 1, 1]  # GRPO's rewards may be the user's functions: scored every time


def test_a_second_run_on_the_same_base_and_data_reuses_the_base_scores(tiny_model, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESTACK_CACHE", str(tmp_path / "cache"))
    scored = []
    real = FineTuneRecipe._score
    monkeypatch.setattr(FineTuneRecipe, "_score", lambda self, model, ex: scored.append(1) or real(self, model, ex))
    overrides = {"eval.retention": False}
    first = run(load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "r1", **overrides)))
    assert len(scored) == 2  # tuned and base
    second = run(load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "r2", **{
        **overrides, "training.lr": 5e-3})))  # another run, same base, data and evaluation
    assert len(scored) == 3  # only the tuned model
    base1, base2 = (json.loads((r.root / "eval.json").read_text())["base"] for r in (first, second))
    assert base1 == base2
    assert len(list((tmp_path / "cache" / "base-scores").iterdir())) == 1
    run(load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "r3", **{
        **overrides, "eval.max_new_tokens": 3})))  # another generation length: the base is scored again
    assert len(scored) == 5
