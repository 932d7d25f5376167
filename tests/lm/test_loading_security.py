"""Supply chain: weights load from safetensors only, and model-repo code runs only when a config says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lm.errors import ConfigError
from lm.loading import load_model


def _bin_only_copy(tiny_model: Path, out: Path) -> Path:
    """The tiny model with its weights as a pickle (what older checkpoints ship), no safetensors."""
    import torch
    from safetensors.torch import load_file

    out.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    torch.save(load_file(tiny_model / "model.safetensors"), out / "pytorch_model.bin")
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    return out


def test_a_pickle_checkpoint_is_refused(tiny_model, tmp_path):
    folder = _bin_only_copy(tiny_model, tmp_path / "bin-model")
    with pytest.raises(ConfigError, match="no safetensors weights; pickle checkpoints"):
        load_model(str(folder))


def test_the_safetensors_model_still_loads(tiny_model):
    assert load_model(str(tiny_model)).num_parameters() > 0


def test_train_cli_refuses_a_pickle_base_with_exit_2(tiny_model, small_data, tmp_path, capsys):
    from tests.conftest import refused, tiny_overrides
    from train.__main__ import main

    folder = _bin_only_copy(tiny_model, tmp_path / "bin-model")
    err = refused(main, capsys, tiny_overrides(folder, small_data, tmp_path / "run"), "safetensors")
    assert str(folder) in err


def _with_repo_code(tiny_model: Path, folder: Path, model_type: str) -> Path:
    """A model folder whose config maps to code shipped beside it; running that code raises SystemExit."""
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('model-repo code ran')\n")
    return folder


def test_model_repo_code_of_an_unknown_architecture_is_refused(tiny_model, tmp_path):
    folder = _with_repo_code(tiny_model, tmp_path / "remote-code", "evil_llama")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_model(str(folder))


def test_model_repo_code_is_not_run_for_a_known_architecture(tiny_model, tmp_path):
    """auto_map beside a known model_type: transformers' own class loads, the shipped code never runs."""
    folder = _with_repo_code(tiny_model, tmp_path / "remote-code", "llama")
    assert type(load_model(str(folder))).__name__ == "LlamaForCausalLM"


def test_trust_remote_code_defaults_off_everywhere():
    """Every config surface that can load a model defaults to not running its code."""
    import inspect

    from lm import loading
    from train.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    for fn in (loading.load_model, loading.load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
