"""Replay rows: the base's own answers, generated once, reused from the checksummed cache, regenerated
for another base, refused when corrupt; and reported in a run's data_report.json."""

from __future__ import annotations

import json

import pytest
import torch

from lm.data.config import DataConfig
from lm.errors import ConfigError
from lm.loading import load_model, load_tokenizer
from tests.conftest import run_train_cli, tiny_overrides


@pytest.fixture(scope="module")
def menu_model(exported):
    """The tiny run's merged model: a small model that answers with words (the random one answers nothing)."""
    return exported["model"]


def _build(menu_model, tmp_path, base_sha="sha-a", load=None):
    from train import replay

    tok = load_tokenizer(str(menu_model))
    calls = []

    def load_base():
        calls.append(1)
        return load_model(str(menu_model), torch.float32)

    cfg = DataConfig(replay=0.5, replay_max_new_tokens=4)
    rep = replay.build(cfg, 20, 0, tok, base_sha, tmp_path / "cache", load or load_base)
    return rep, calls


def test_generated_once_then_reused_and_regenerated_for_another_base(menu_model, tmp_path):
    rep, calls = _build(menu_model, tmp_path)
    assert calls == [1] and not rep.report["cache_reused"] and rep.report["rows"] == 10 == len(rep.examples)
    assert rep.report["pool"] >= 300 and len(rep.report["rows_sha256"]) == 64
    ex = rep.examples[0]
    assert [m["role"] for m in ex.messages] == ["user", "assistant"] and ex.messages[1]["content"].strip()
    assert rep.report["with_training_system_prompt"] == 0
    assert ex.where.startswith("replay:")

    def no_model():
        raise AssertionError("a cached replay must not load the base")

    again, _ = _build(menu_model, tmp_path, load=no_model)
    assert again.report["cache_reused"] and [e.messages for e in again.examples] == [e.messages for e in rep.examples]
    other, calls = _build(menu_model, tmp_path, base_sha="sha-b")
    assert calls == [1] and not other.report["cache_reused"] and other.report["cache"] != rep.report["cache"]


def test_a_corrupt_cache_is_refused_not_reused(menu_model, tmp_path):
    rep, _ = _build(menu_model, tmp_path)
    rows = tmp_path / "cache" / "replay" / rep.report["cache"].rsplit("/", 1)[1] / "rows.jsonl"
    rows.write_text(rows.read_text().replace('"answer": "', '"answer": "x', 1))
    with pytest.raises(ConfigError, match="rows.jsonl: replay cache checksum mismatch"):
        _build(menu_model, tmp_path)


def test_a_run_reports_its_replay_rows(menu_model, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESTACK_CACHE", str(tmp_path / "cache"))
    p = run_train_cli(*tiny_overrides(menu_model, small_data, tmp_path / "run", **{
        "data.replay": 0.25, "data.replay_max_new_tokens": 4, "training.max_steps": 1, "eval.enabled": False}))
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert rep["replay"]["rows"] == round(0.25 * rep["train"]["rows_used"]) and rep["replay"]["fraction"] == 0.25
    assert "replay:" in p.stdout and rep["replay"]["cache"].startswith(str(tmp_path / "cache"))
    assert rep["replay"]["with_training_system_prompt"] == (rep["replay"]["rows"] + 1) // 2  # the chef prompt


def test_replay_is_refused_for_preference_methods(small_data, tiny_model, tmp_path):
    p = run_train_cli(*tiny_overrides(tiny_model, small_data, tmp_path / "run", **{
        "data.replay": 0.25, "method.name": "dpo"}))
    assert p.returncode == 2 and "data.replay: not for dpo" in p.stderr and len(p.stderr.strip().splitlines()) == 1
