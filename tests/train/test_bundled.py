"""Bundled configs by name, and where a config's relative paths point (train/bundled.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm.errors import ConfigError
from tests.conftest import ROOT, refused
from train import bundled
from train.__main__ import main
from train.config import load_config


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """An empty working directory: nothing of the checkout is reachable by a relative path."""
    cwd = tmp_path / "empty"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_every_bundled_config_is_named_and_its_data_exists(elsewhere):
    assert bundled.names() == sorted(p.stem for p in (ROOT / "train" / "configs").glob("*.yaml"))
    for name in bundled.names():
        cfg = load_config(name)
        for f in ("train", "eval"):
            v = getattr(cfg.data, f)
            assert v is None or (Path(v).is_absolute() and Path(v).is_file()), f"{name}: data.{f} {v}"
        assert not Path(cfg.output.dir).is_absolute(), f"{name}: output.dir must stay cwd-relative"


def test_name_with_suffix_and_json_schema_reward(elsewhere):
    cfg = load_config("smollm2_grpo_chef.yaml")
    schema = [r for r in cfg.method.rewards if r.startswith("json_schema:")]
    assert schema and Path(schema[0].split(":", 1)[1]).resolve() == (ROOT / "train/demo_data/chef_answer.schema.json").resolve()


def test_defaults_are_the_bundled_demo_data(elsewhere):
    cfg = load_config(None)
    assert Path(cfg.data.train).resolve() == (ROOT / "train/demo_data/chef_train.jsonl").resolve()
    assert Path(cfg.data.eval).resolve() == (ROOT / "train/demo_data/chef_heldout.jsonl").resolve()


def test_file_values_resolve_against_the_file_and_overrides_against_the_cwd(elsewhere, tmp_path):
    conf = tmp_path / "proj" / "conf"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("data:\n  train: ../data/rows.jsonl\n  eval: /abs/held.jsonl\n"
                                    "eval:\n  retain: general.jsonl\noutput:\n  dir: runs/mine\n")
    cfg = load_config(conf / "mine.yaml", ["data.validation=val.jsonl"])
    assert cfg.data.train == str(tmp_path / "proj" / "data" / "rows.jsonl")
    assert cfg.data.eval == "/abs/held.jsonl"
    assert cfg.eval.retain == str(conf / "general.jsonl")
    assert cfg.data.validation == "val.jsonl"  # command line: the working directory's
    assert cfg.output.dir == "runs/mine"  # runs go where the command runs


def test_a_path_wins_over_a_bundled_name(elsewhere):
    (elsewhere / "smollm2_lora_chef").write_text("method:\n  r: 3\n")
    assert load_config("smollm2_lora_chef").method.r == 3


@pytest.mark.parametrize("arg", ["missing.yaml", "smollm2_nosuch", "sub/smollm2_lora_chef.yaml"])
def test_missing_config_exits_2_naming_it(elsewhere, capsys, arg):
    refused(main, capsys, [arg], arg, "config file not found", "smollm2_lora_chef")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(arg)
