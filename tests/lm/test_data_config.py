"""A run's data and eval sections read back from its resolved config.yaml (export's quality gate)."""

from __future__ import annotations

import pytest

from lm.data.config import DataConfig, EvalConfig, RunData
from lm.errors import ConfigError
from train.config import load_config


def test_round_trip_from_the_training_config(tmp_path):
    cfg = load_config(None, ["data.max_length=64", "eval.max_examples=5", "training.seed=7", "data.labels=[a,b]"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    rd = RunData.from_config_yaml(path)
    assert rd.data == cfg.data and rd.eval == cfg.eval and rd.seed == 7
    assert isinstance(rd.data, DataConfig) and isinstance(rd.eval, EvalConfig)


def test_unreadable_config_is_a_config_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="config.yaml: unreadable run config"):
        RunData.from_config_yaml(path)
