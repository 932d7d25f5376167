"""`tunestack registry list|publish|rollback|prune` on a registry of tiny-model runs: versions, their evidence,
the gate's verdicts and the override's recorded reason."""

from __future__ import annotations

import pytest

from artifacts import GatePolicy, Manifest, Registry
from tests.artifacts.test_gate import GOOD, _run_with
from tests.artifacts.test_registry import finished_run  # noqa: F401
from tests.conftest import refused
from tunestack.cli import main

BAD = {**GOOD, "retention": {"base": 0.62, "tuned": 0.17}}  # a 45-point retention drop: the gate refuses it


@pytest.fixture
def runs(finished_run, tmp_path):  # noqa: F811
    return {"good": _run_with(finished_run.root, tmp_path / "good", GOOD),
            "bad": _run_with(finished_run.root, tmp_path / "bad", BAD)}


def test_list_shows_versions_evidence_and_rollback(runs, tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    reg.publish_run(runs["bad"], "chef", gate=GatePolicy(), override_gate="launch day")
    assert main(["registry", "list", "--registry", str(reg.root)]) == 0
    out = capsys.readouterr().out
    assert "adapter chef -> v2" in out and "gain +88.0 (keyword_accuracy)" in out
    assert "* chef@v2" in out and "gate OVERRIDDEN by 'launch day' (min_gain 1, max_retention_drop 10)" in out
    assert "retention 62.0 -> 58.0 %, gate passed (min_gain 1, max_retention_drop 10)" in out  # v1's line
    assert main(["registry", "rollback", "chef@v1", "--registry", str(reg.root)]) == 0
    assert "v2 -> v1" in capsys.readouterr().out
    main(["registry", "list", "--registry", str(reg.root)])
    out = capsys.readouterr().out
    assert "adapter chef -> v1" in out and "* chef@v1" in out
    refused(main, capsys, ["registry", "rollback", "chef", "--registry", str(reg.root)],
            "name the version, e.g. chef@v1 (kept: v1, v2)")
    refused(main, capsys, ["registry", "rollback", "../x@v1", "--registry", str(reg.root)], "invalid name")
    refused(main, capsys, ["registry", "list", "--registry", str(tmp_path / "empty")], "no base model registered")


def test_publish_a_run_through_the_gate_and_override_it_with_a_reason(runs, tmp_path, capsys):
    reg = tmp_path / "reg"
    refused(main, capsys, ["registry", "publish", str(runs["bad"]), "--registry", str(reg), "--name", "chef"],
            "refusing to publish 'chef'", "retention dropped more than max_retention_drop", "45.0",
            "--override-gate REASON")
    assert not (reg / "adapters").exists()  # nothing written
    refused(main, capsys, ["registry", "publish", str(runs["bad"]), "--registry", str(reg), "--override-gate", " "],
            "needs a reason")
    assert main(["registry", "publish", str(runs["bad"]), "--registry", str(reg), "--name", "chef",
                 "--override-gate", "menu launch; retention fixed next"]) == 0
    assert "gate REFUSED, overridden: menu launch; retention fixed next" in capsys.readouterr().out
    m = Registry(reg).verify("adapters", "chef")
    assert m.extra["gate"]["override_reason"] == "menu launch; retention fixed next" and not m.extra["gate"]["passed"]
    assert "menu launch; retention fixed next" in (reg / "adapters" / "chef" / "README.md").read_text()
    # the run's folder name is the default name; a looser threshold on the command line passes the gate
    assert main(["registry", "publish", str(runs["bad"]), "--registry", str(reg), "--max-retention-drop", "50"]) == 0
    gate = Registry(reg).manifest("adapters", "bad").extra["gate"]
    assert gate["passed"] and gate["max_retention_drop"] == 50 and gate["override_reason"] is None


def test_publish_refuses_what_is_neither_a_run_nor_an_export(runs, tmp_path, capsys):
    reg = tmp_path / "reg"
    refused(main, capsys, ["registry", "publish", str(tmp_path / "nope"), "--registry", str(reg)],
            str(tmp_path / "nope"), "no such folder")
    (tmp_path / "empty").mkdir()
    refused(main, capsys, ["registry", "publish", str(tmp_path / "empty"), "--registry", str(reg)],
            str(tmp_path / "empty"), "neither a finished run nor an export")
    Registry(reg).publish_run(runs["good"], "chef")
    base = Registry(reg).base()[1]
    refused(main, capsys, ["registry", "publish", str(base), "--registry", str(tmp_path / "r2")],
            "kind 'base'", "publish takes a finished run")
    assert not (tmp_path / "r2").exists()


def test_publish_an_exported_folder_needs_a_name(runs, tmp_path, capsys):
    """An export (manifest kind 'model') goes to models/; here a run's adapter relabelled as one stands in."""
    export = _run_with(runs["good"], tmp_path / "export", GOOD)
    m = Manifest.read(export)
    m.kind = "model"
    m.write(export)
    reg = tmp_path / "reg"
    refused(main, capsys, ["registry", "publish", str(export), "--registry", str(reg)], "--name NAME")
    assert main(["registry", "publish", str(export), "--registry", str(reg), "--name", "chef-onnx"]) == 0
    assert Registry(reg).names("models", versions=False) == ["chef-onnx"]
    assert Registry(reg).manifest("models", "chef-onnx").extra["gate"]["passed"]


def test_prune_keeps_n_and_never_the_served_version(runs, tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    for _ in range(4):
        reg.publish_run(runs["good"], "chef", gate=GatePolicy())
    reg.rollback("adapters", "chef", 1)
    assert main(["registry", "prune", "chef", "--keep", "1", "--registry", str(reg.root)]) == 0
    assert "adapters/chef: removed v2, v3; kept v1, v4" in capsys.readouterr().out
    assert [v.version for v in reg.versions("adapters", "chef")] == [1, 4] and reg.serving_version("adapters", "chef") == 1
    assert main(["registry", "prune", "--registry", str(reg.root)]) == 0  # every name, default keep: nothing to do
    assert "adapters/chef: removed nothing; kept v1, v4" in capsys.readouterr().out
    refused(main, capsys, ["registry", "prune", "nope", "--registry", str(reg.root)], "no name 'nope'")
    refused(main, capsys, ["registry", "prune", "chef", "--keep", "0", "--registry", str(reg.root)], "keep must be >= 1")
