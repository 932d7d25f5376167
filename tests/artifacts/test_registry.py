"""Atomic writes, manifest checksums and the registry's publish/unpublish contract."""

from __future__ import annotations

import json
import os

import pytest

from artifacts import Manifest, ManifestError, Registry, RegistryError, RunDir, atomic_dir, tree_sha256
from tests.conftest import tiny_overrides
from train.config import load_config
from train.recipe import run


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_atomic_dir_replace_is_all_or_nothing(tmp_path):
    target = tmp_path / "a"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "/etc/passwd", "..", ".hidden", "", "x" * 65, "a..b"])
def test_names_are_never_paths(name, tmp_path):
    with pytest.raises(RegistryError):
        Registry(tmp_path).path("adapters", name)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    from tests.conftest import DEMO_HELDOUT, DEMO_TRAIN

    train = d / "train.jsonl"
    train.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:32]) + "\n")
    ev = d / "eval.jsonl"
    ev.write_text("\n".join(DEMO_HELDOUT.read_text().splitlines()[:4]) + "\n")
    cfg = load_config(None, tiny_overrides(tiny_model, {"train": train, "eval": ev}, d / "run",
                                           **{"training.max_steps": 2}))
    return run(cfg)


def test_publish_registers_base_and_adapter(finished_run, tmp_path):
    reg = Registry(tmp_path / "reg")
    path = reg.publish_run(finished_run.root, "chef")
    assert reg.adapters() == ["chef"]
    name, base = reg.base()
    m = reg.verify("adapters", "chef")
    assert m.kind == "adapter" and m.base_model["sha256"] == tree_sha256(base)
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    assert m.servability["vllm"]["ok"] and m.peft_config["r"] == 4
    assert path.name == "chef@v1" and reg.names("adapters") == ["chef", "chef@v1"]
    reg.publish_run(finished_run.root, "chef-2")
    assert reg.adapters() == ["chef", "chef-2"]
    reg.unpublish("adapters", "chef")
    assert reg.adapters() == ["chef-2"] and not any(p.name.startswith(".") for p in (tmp_path / "reg/adapters").iterdir())
    assert reg.names("adapters") == ["chef-2", "chef-2@v1"]


def test_publish_refuses_unfinished_or_corrupt_runs(finished_run, tmp_path):
    reg = Registry(tmp_path / "reg")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(finished_run.root, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(RegistryError, match="no manifest"):
        reg.publish_run(broken, "x")
    shutil.copytree(finished_run.root, tmp_path / "corrupt")
    with open(tmp_path / "corrupt/adapter/adapter_model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(RegistryError, match="sha256 does not match"):
        reg.publish_run(tmp_path / "corrupt", "x")
    assert reg.adapters() == []


def test_publish_refuses_a_different_base(finished_run, tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish_run(finished_run.root, "ok")
    m = Manifest.read(finished_run.root)
    other = tmp_path / "other-run"
    import shutil

    shutil.copytree(finished_run.root, other)
    m.base_model = {**m.base_model, "sha256": "0" * 64}
    m.write(other)
    with pytest.raises(RegistryError, match="trained on base sha256 000000000000"):
        reg.publish_run(other, "wrong-base")


def test_manifest_rejects_unknown_schema(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "run", "schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version"):
        Manifest.read(tmp_path)


def test_run_dir_layout(finished_run):
    rd = RunDir(finished_run.root)
    for p in (rd.config, rd.manifest, rd.eval, rd.predictions, rd.data_report, rd.model_card, rd.metrics_log, rd.plot):
        assert p.is_file(), p
    assert rd.last_checkpoint() is not None
