"""Config loading, overrides, validation and --help."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from train.__main__ import main
from train.config import Config, help_text, load_config
from lm.errors import ConfigError

CONFIGS = sorted((ROOT / "train" / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for f in ("train", "eval"):
        v = getattr(cfg.data, f)
        assert v is None or (ROOT / v).is_file(), f"{path.name}: data.{f} {v} missing"


def test_overrides_win_and_are_typed():
    cfg = load_config(ROOT / "train/configs/smollm2_lora_chef.yaml",
                      ["method.r=8", "training.lr=1e-4", "method.target_modules=[q_proj,v_proj]", "output.merge=true"])
    assert cfg.method.r == 8 and cfg.training.lr == 1e-4 and cfg.output.merge is True
    assert cfg.method.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override,message", [
    ("training.lr=fast", "training.lr: expected float"),
    ("method.name=qlora9", "method.name: 'qlora9' unknown"),
    ("nosuch.x=1", "nosuch: unknown section"),
    ("training.epochz=1", "training.epochz: unknown field"),
    ("training.batch_size=0", "training.batch_size: must be >= 1"),
    ("justtext", "expected section.field=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_bad_yaml_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  lr: 1e-3\n  epochs: [1\n")
    assert main([str(p)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml:" in err and "invalid YAML" in err


def test_unknown_field_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: method.rank: unknown field"):
        load_config(p)


def test_help_documents_every_field():
    text = help_text()
    import dataclasses

    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(Config(), section.name)):
            assert f"{section.name}.{f.name} =" in text
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no reason"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "train/configs/smollm2_lora_chef.yaml", ["method.r=4"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "configs").glob("smollm2_*.yaml")), ids=lambda p: p.stem)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    assert f"_{cfg.method.name}_" in path.stem  # smollm2_<method>_<task>.yaml
