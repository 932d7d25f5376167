"""Settings from the environment: typed casts, refusals, and the GPU-host rule for the torch engine."""

from __future__ import annotations

import pytest
import torch

from serve.settings import Settings


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False),
                                        ("", False)])
def test_bool_settings_parse_like_a_flag(raw, value):
    assert Settings.from_env({"SERVE_CPU_ON_GPU_HOST": raw}).cpu_on_gpu_host is value


def test_a_bool_setting_refuses_other_words():
    with pytest.raises(ValueError, match="SERVE_CPU_ON_GPU_HOST"):
        Settings.from_env({"SERVE_CPU_ON_GPU_HOST": "maybe"})


def test_serve_on_a_gpu_host_exits_2_naming_the_vllm_backend(monkeypatch, tmp_path, capsys):
    """The torch engine would leave the GPU idle: refused before the registry is even read, unless opted in."""
    from serve.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["--registry", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SERVE_BACKEND=vllm" in err and "SERVE_CPU_ON_GPU_HOST=1" in err, err
    monkeypatch.setenv("SERVE_CPU_ON_GPU_HOST", "1")
    assert main(["--registry", str(tmp_path / "none")]) == 2  # now past the GPU rule, refused for the empty registry
    assert "no base model in the registry" in capsys.readouterr().err
