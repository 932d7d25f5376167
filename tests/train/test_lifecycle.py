"""Output-dir safety and early stopping (kill -9 + --resume: tests/reliability/test_training.py)."""

from __future__ import annotations

import json
import os

from tests.conftest import tiny_overrides
from train.__main__ import main
from train.config import load_config
from train.recipe import run


def test_existing_output_dir_is_refused(tiny_model, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(tiny_overrides(tiny_model, small_data, out)) == 2
    assert "output.dir exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_early_stopping_stops_when_val_loss_stalls(tiny_model, small_data, tmp_path):
    # lr so small the validation loss cannot improve: patience 2 must stop the run long before max_steps.
    cfg = load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "r", **{
        "training.max_steps": 60, "training.lr": 1e-12, "training.eval_steps": 1,
        "training.early_stopping_patience": 2, "eval.enabled": False}))
    rd = run(cfg)
    ev = json.loads(rd.eval.read_text())
    assert ev["train_steps"] <= 5, ev


def test_tensorboard_logs_into_the_run_and_the_process_environment_is_unchanged(tiny_model, small_data, tmp_path,
                                                                                 monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # transformers' fallback would be runs/<date> under the working directory
    before = dict(os.environ)
    cfg = load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "r", **{
        "training.max_steps": 2, "eval.enabled": False}))
    rd = run(cfg)
    assert dict(os.environ) == before
    events = list(rd.tensorboard.glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in rd.tensorboard.parent.iterdir())
    acc = EventAccumulator(str(rd.tensorboard)).Reload()
    assert len(acc.Scalars("train/loss")) == 2  # logging_steps=1: one point a step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "r", "train.jsonl"]
