"""Which checkpoint --resume may continue from, and when it must refuse: no training needed."""

from __future__ import annotations

import json

import pytest
import yaml

from artifacts import RunDir
from lm.errors import ConfigError
from train import checkpoints


def _checkpoint(rd: RunDir, step: int, skip: str = "") -> None:
    ck = rd.checkpoints / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    files = {"adapter_model.safetensors": b"w", "optimizer.pt": b"o", "scheduler.pt": b"s", "rng_state.pth": b"r",
             "trainer_state.json": json.dumps({"global_step": step}).encode()}
    for name, data in files.items():
        if name != skip:
            (ck / name).write_bytes(data)


@pytest.mark.parametrize("skip, why", [("adapter_model.safetensors", "no safetensors weights"),
                                       ("optimizer.pt", "no optimizer.pt"), ("scheduler.pt", "no scheduler.pt"),
                                       ("rng_state.pth", "no rng_state.pth"),
                                       ("trainer_state.json", "no trainer_state.json")])
def test_newest_complete_checkpoint_wins_and_cut_short_ones_are_removed(skip, why, tmp_path, capsys):
    rd = RunDir(tmp_path)
    _checkpoint(rd, 4)
    _checkpoint(rd, 8, skip=skip)
    ck, skipped = checkpoints.resume_point(rd)
    assert ck.step == 4 and [p.name for p, _ in skipped] == ["checkpoint-8"] and skipped[0][1].startswith(why)
    checkpoints.discard(skipped, ck)
    assert "checkpoint-8 is incomplete" in capsys.readouterr().out and not (rd.checkpoints / "checkpoint-8").exists()


def test_pickle_weights_and_a_wrong_or_torn_state_do_not_count(tmp_path):
    rd = RunDir(tmp_path)
    _checkpoint(rd, 2, skip="adapter_model.safetensors")
    (rd.checkpoints / "checkpoint-2" / "adapter_model.bin").write_bytes(b"pickle")
    _checkpoint(rd, 3)
    (rd.checkpoints / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 2}')
    _checkpoint(rd, 5)
    (rd.checkpoints / "checkpoint-5" / "trainer_state.json").write_text('{"global_st')
    with pytest.raises(ConfigError, match="no complete checkpoint.*checkpoint-5: unreadable trainer_state.json.*"
                                          "checkpoint-3: trainer_state.json is for step 2.*checkpoint-2: no safetensors"):
        checkpoints.resume_point(rd)


def test_metrics_log_is_trimmed_to_the_resumed_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.9}\n{"step": 3, "loss": 1.5}\n{"step": ')
    checkpoints.trim_metrics(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_resume_refuses_changed_settings_or_data_but_not_stop_or_eval_settings(tmp_path):
    rd = RunDir(tmp_path)
    cfg = {"training": {"lr": 1e-3, "max_steps": 10}, "eval": {"max_new_tokens": 4}, "data": {"train": "t.jsonl"}}
    report = {"train": {"sha256": "a" * 64}, "validation": {"split_from": "train"}, "eval": {"sha256": "e" * 64}}
    rd.config.write_text(yaml.safe_dump(cfg))
    rd.data_report.write_text(json.dumps(report))
    later = {**cfg, "training": {"lr": 1e-3, "max_steps": 20}, "eval": {"max_new_tokens": 64}}
    checkpoints.check_same_run(rd, later, {**report, "eval": {"sha256": "f" * 64}})
    with pytest.raises(ConfigError, match="training.lr changed"):
        checkpoints.check_same_run(rd, {**cfg, "training": {"lr": 2e-3, "max_steps": 10}}, report)
    with pytest.raises(ConfigError, match=r"train data \(sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb\)"):
        checkpoints.check_same_run(rd, cfg, {**report, "train": {"sha256": "b" * 64}})
