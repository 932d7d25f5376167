"""Registry versions: every publish adds one, the name serves the latest that passed, rollback and prune."""

from __future__ import annotations

import os
import shutil

import pytest

from artifacts import GatePolicy, GateRefused, Manifest, Registry, RegistryError
from tests.artifacts.test_gate import GOOD, _run_with
from tests.artifacts.test_registry import finished_run  # noqa: F401


@pytest.fixture
def runs(finished_run, tmp_path):  # noqa: F811
    return {"good": _run_with(finished_run.root, tmp_path / "good", GOOD),
            "bad": _run_with(finished_run.root, tmp_path / "bad", {**GOOD, "retention": {"base": 0.6, "tuned": 0.1}})}


def test_publishing_twice_keeps_both_and_serves_the_latest(runs, tmp_path):
    reg = Registry(tmp_path / "reg")
    v1 = reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    v2 = reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    assert (v1.name, v2.name) == ("chef@v1", "chef@v2")
    assert reg.path("adapters", "chef") == v2 and reg.serving_version("adapters", "chef") == 2
    assert [(v.version, v.serving) for v in reg.versions("adapters", "chef")] == [(1, False), (2, True)]
    assert reg.names("adapters") == ["chef", "chef@v1", "chef@v2"] and reg.adapters() == ["chef"]
    m = reg.verify("adapters", "chef@v1")
    assert m.extra["version"] == 1 and m.extra["run"] == str(runs["good"].resolve())
    assert os.readlink(tmp_path / "reg/adapters/chef") == "chef@v2"  # relative: survives a moved volume


def test_a_refused_version_never_replaces_the_served_one(runs, tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    with pytest.raises(GateRefused):
        reg.publish_run(runs["bad"], "chef", gate=GatePolicy())
    assert reg.serving_version("adapters", "chef") == 1 and [v.version for v in reg.versions("adapters", "chef")] == [1]


def test_rollback_and_prune_never_remove_the_served_version(runs, tmp_path):
    reg = Registry(tmp_path / "reg")
    for _ in range(3):
        reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    reg.rollback("adapters", "chef", 1)
    assert reg.serving_version("adapters", "chef") == 1 and reg.manifest("adapters", "chef").extra["version"] == 1
    reg.publish_run(runs["good"], "chef", gate=GatePolicy(), keep=2)  # v4 is served; the newest two are kept
    assert [v.version for v in reg.versions("adapters", "chef")] == [3, 4]
    reg.rollback("adapters", "chef", 3)
    reg.publish_run(runs["good"], "chef", gate=GatePolicy())  # v5
    reg.rollback("adapters", "chef", 3)
    assert reg.prune("adapters", "chef", keep=1) == [4]  # the newest (v5) and the served (v3) stay
    assert [v.version for v in reg.versions("adapters", "chef")] == [3, 5]
    with pytest.raises(RegistryError, match="no version v9 .kept: v3, v5"):
        reg.rollback("adapters", "chef", 9)
    with pytest.raises(RegistryError, match="serves chef@v3"):
        reg.unpublish("adapters", "chef@v3")


def test_rollback_refuses_a_corrupt_version(runs, tmp_path):
    reg = Registry(tmp_path / "reg")
    v1 = reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    (v1 / "adapter_config.json").write_text("{}")
    with pytest.raises(RegistryError, match="sha256 does not match"):
        reg.rollback("adapters", "chef", 1)
    assert reg.serving_version("adapters", "chef") == 2


def test_an_entry_from_before_versions_becomes_v1(runs, tmp_path):
    reg = Registry(tmp_path / "reg")
    v1 = reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    legacy = tmp_path / "reg/adapters/chef"
    legacy.unlink()
    os.rename(v1, legacy)  # the old layout: a plain folder under the name
    assert reg.serving_version("adapters", "chef") is None and reg.adapters() == ["chef"]
    v2 = reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    assert v2.name == "chef@v2" and [v.version for v in reg.versions("adapters", "chef")] == [1, 2]
    reg.verify("adapters", "chef@v1")


def test_pinned_names_are_refs_not_paths(tmp_path):
    reg = Registry(tmp_path)
    for bad in ("chef@v0", "chef@1", "../chef@v1", "chef@v1/x", "chef@v1@v2"):
        with pytest.raises(RegistryError):
            reg.path("adapters", bad)
    with pytest.raises(RegistryError):
        Registry(tmp_path).publish_run(tmp_path, "chef@v1")


def test_unpublish_removes_the_name_and_its_versions(runs, tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    reg.unpublish("adapters", "chef@v1")
    assert reg.names("adapters") == ["chef", "chef@v2"]
    reg.unpublish("adapters", "chef")
    assert os.listdir(tmp_path / "reg/adapters") == []
    shutil.rmtree(tmp_path / "reg")
    assert Manifest  # imported for the fixtures' helpers
