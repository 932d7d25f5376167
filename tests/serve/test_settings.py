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


def test_each_field_is_its_own_serve_variable_and_carries_its_reason():
    """SERVE_<FIELD> maps one-to-one onto the fields: each variable sets its field and no other."""
    import dataclasses
    from pathlib import Path

    default = Settings()
    values = {"int": "4096", "float": "0.75", "bool": "1", "Path": "/elsewhere", "str": None}
    for f in dataclasses.fields(Settings):
        assert len(f.metadata.get("help", "")) > 10, f"{f.name}: no reason given"
        if f.name in ("backend", "engine", "lora_impl", "dtype", "forward", "finetune_worker"):
            continue  # choices: refused as a free string; each choice is tested where it matters
        raw = values[f.type] or "a-long-enough-key"
        got = Settings.from_env({f"SERVE_{f.name.upper()}": raw})
        changed = {g.name for g in dataclasses.fields(Settings) if getattr(got, g.name) != getattr(default, g.name)}
        assert changed == {f.name}, (f.name, changed)
        assert getattr(got, f.name) != getattr(default, f.name) and (f.type != "Path" or getattr(got, f.name) == Path(raw))


def test_every_serve_variable_the_docs_and_deployments_name_is_a_setting():
    import dataclasses
    import re

    from tests.conftest import ROOT

    fields = {f"SERVE_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    places = [ROOT / "README.md", ROOT / "Dockerfile", *ROOT.glob("compose*.yaml"), *(ROOT / "docs").glob("*.md"),
              *(ROOT / "k8s").rglob("*.yaml")]
    named = {(m, p.name) for p in places for m in re.findall(r"\bSERVE_[A-Z_]+[A-Z]\b", p.read_text())}
    assert named, "the scan found nothing: the pattern or the places are wrong"
    assert {(m, where) for m, where in named if m not in fields} == set()
