"""Every method trains end to end on the tiny model and writes the right artifacts."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from artifacts import Manifest
from tests.conftest import tiny_overrides
from train.config import load_config
from lm.errors import ConfigError
from train.recipe import run


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "full"])
def test_method_trains_and_saves(method, tiny_model, small_data, tmp_path):
    out = tmp_path / method
    cfg = load_config(None, tiny_overrides(tiny_model, small_data, out, **{"method.name": method}))
    rd = run(cfg)
    m = Manifest.read(rd.root)
    m.verify_files(rd.root)
    assert m.method == method
    ev = json.loads(rd.eval.read_text())
    assert ev["tuned"]["val_loss"] < ev["base"]["val_loss"], "training must reduce validation loss"
    if method == "full":
        assert (rd.model / "model.safetensors").is_file() and not rd.adapter.exists()
        assert m.peft_config is None
    else:
        assert (rd.adapter / "adapter_config.json").is_file()
        with safe_open(rd.adapter / "adapter_model.safetensors", "pt") as f:
            assert len(list(f.keys())) > 0
        assert not (rd.adapter / "training_args.bin").exists()
        expected_vllm = method == "lora"
        assert m.servability["vllm"]["ok"] is expected_vllm, m.servability
    assert rd.plot.is_file() and rd.metrics_log.is_file() and any(rd.tensorboard.iterdir())
    assert "## Metrics" in rd.model_card.read_text()


def test_missing_target_module_is_a_config_error(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_model, small_data, out, **{"method.target_modules": "[q_proj,qkv_proj]"}))
    with pytest.raises(ConfigError, match=r"method.target_modules: \['qkv_proj'\] not in this model"):
        run(cfg)
    assert not out.exists()


def test_lora_manifest_records_rank_and_targets(tiny_model, small_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_model, small_data, tmp_path / "r",
                                           **{"method.r": 12, "method.target_modules": "[q_proj,v_proj]"}))
    m = Manifest.read(run(cfg).root)
    assert m.peft_config["r"] == 12 and sorted(m.peft_config["target_modules"]) == ["q_proj", "v_proj"]
    assert m.servability["vllm"]["max_lora_rank"] == 16  # 12 rounds up to a rank vLLM allows
    assert len(m.base_model["sha256"]) == 64 and m.dataset["train"]["rows_used"] > 0
    assert {"torch", "transformers", "peft"} <= set(m.versions)
