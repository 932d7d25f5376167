"""`python -m serve list` and `python -m serve rollback`: versions, their evidence and the gate's verdicts."""

from __future__ import annotations

from artifacts import GatePolicy, Registry
from serve.__main__ import main
from tests.artifacts.test_gate import GOOD, _run_with
from tests.artifacts.test_registry import finished_run  # noqa: F401


def test_list_shows_versions_evidence_and_rollback(finished_run, tmp_path, capsys):  # noqa: F811
    good = _run_with(finished_run.root, tmp_path / "good", GOOD)
    bad = _run_with(finished_run.root, tmp_path / "bad", {**GOOD, "retention": {"base": 0.62, "tuned": 0.17}})
    reg = Registry(tmp_path / "reg")
    reg.publish_run(good, "chef", gate=GatePolicy())
    reg.publish_run(bad, "chef", gate=GatePolicy(), force=True)
    assert main(["list", "--registry", str(reg.root)]) == 0
    out = capsys.readouterr().out
    assert "adapter chef -> v2" in out and "gain +88.0 (keyword_accuracy)" in out
    assert "* chef@v2" in out and "gate FORCED (min_gain 1, max_retention_drop 10)" in out
    assert "retention 62.0 -> 58.0 %, gate passed (min_gain 1, max_retention_drop 10)" in out  # v1's line
    assert main(["rollback", "chef@v1", "--registry", str(reg.root)]) == 0
    assert "v2 -> v1" in capsys.readouterr().out
    main(["list", "--registry", str(reg.root)])
    out = capsys.readouterr().out
    assert "adapter chef -> v1" in out and "* chef@v1" in out
    assert main(["rollback", "chef", "--registry", str(reg.root)]) == 2
    assert "name the version, e.g. chef@v1 (kept: v1, v2)" in capsys.readouterr().err
    assert main(["rollback", "../x@v1", "--registry", str(reg.root)]) == 2
