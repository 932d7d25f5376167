"""The publish gate on constructed manifests: refusals name both numbers, --override-gate REASON is recorded."""

from __future__ import annotations

import shutil

import pytest

from artifacts import GatePolicy, GateRefused, Manifest, Registry
from artifacts.gate import check
from tests.artifacts.test_registry import finished_run  # noqa: F401  (module fixture: one tiny run)

GOOD = {"headline": {"metric": "keyword_accuracy", "base": 0.02, "tuned": 0.9, "gain_points": 88.0},
        "retention": {"base": 0.62, "tuned": 0.58, "drop_points": 4.0, "kl": 0.1, "rows": 200}}


def test_passes_with_gain_and_retention():
    res = check(GOOD, GatePolicy(min_gain=1.0, max_retention_drop=10.0))
    assert res.passed and res.task_gain == 88.0 and res.retention_drop == pytest.approx(4.0)


@pytest.mark.parametrize("metrics,policy,reason", [
    ({**GOOD, "retention": {"base": 0.62, "tuned": 0.17}}, GatePolicy(), "retention dropped"),
    ({**GOOD, "headline": {**GOOD["headline"], "gain_points": 0.5}}, GatePolicy(min_gain=1.0), "task gain below"),
    ({"headline": GOOD["headline"]}, GatePolicy(), "no retention measurement"),
    ({"retention": GOOD["retention"]}, GatePolicy(), "no base-vs-tuned task metric"),
    (GOOD, GatePolicy(min_gain=90.0), "task gain below"),
    (GOOD, GatePolicy(max_retention_drop=3.0), "retention dropped"),
])
def test_refuses(metrics, policy, reason):
    res = check(metrics, policy)
    assert not res.passed and any(reason in r for r in res.reasons)


def _run_with(src, dst, metrics):
    shutil.copytree(src, dst)
    m = Manifest.read(dst)
    m.metrics = metrics
    m.write(dst)
    return dst


def test_registry_refuses_in_one_line_and_the_override_reason_is_recorded(finished_run, tmp_path):  # noqa: F811
    bad = _run_with(finished_run.root, tmp_path / "bad", {**GOOD, "retention": {"base": 0.62, "tuned": 0.17}})
    reg = Registry(tmp_path / "reg")
    with pytest.raises(GateRefused) as e:
        reg.publish_run(bad, "chef", gate=GatePolicy())
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "+88.0" in msg and "45.0" in msg and "62.0 -> 17.0" in msg, msg
    assert reg.adapters() == []  # nothing written
    assert "--override-gate REASON" in msg, msg
    for blank in ("", "   "):  # an override must say why
        with pytest.raises(GateRefused, match="needs a reason"):
            reg.publish_run(bad, "chef", gate=GatePolicy(), override_gate=blank)
    assert reg.adapters() == []
    path = reg.publish_run(bad, "chef", gate=GatePolicy(), override_gate="menu launch; retention fixed in v2")
    gate = Manifest.read(path).extra["gate"]
    assert gate["forced"] and not gate["passed"] and gate["retention_drop"] == pytest.approx(45.0)
    assert gate["override_reason"] == "menu launch; retention fixed in v2"
    assert gate["max_retention_drop"] == 10.0 and gate["min_gain"] == 1.0
    card = (path / "README.md").read_text()
    assert "Publish gate (version v1)" in card and "--override-gate" in card and "45.0" in card
    assert "menu launch; retention fixed in v2" in card
    reg.verify("adapters", "chef")  # the card's new checksum is in the manifest


def test_passing_run_records_the_gate(finished_run, tmp_path):  # noqa: F811
    good = _run_with(finished_run.root, tmp_path / "good", GOOD)
    path = Registry(tmp_path / "reg").publish_run(good, "chef", gate=GatePolicy(min_gain=5, max_retention_drop=8))
    gate = Manifest.read(path).extra["gate"]
    assert gate["passed"] and not gate["forced"] and gate["min_gain"] == 5 and gate["task_gain"] == 88.0
    assert gate["override_reason"] is None
