"""The evidence that a tuned model is better and still knows what its base knew, from a run or a version.

    task        the headline metric, base vs tuned, and the gain in points (eval.json / manifest metrics.headline)
    retention   general-set accuracy overall and by category, base vs tuned, and example answers the tuned
                model lost (eval.json's retention report, retention_predictions.jsonl)
    kl          KL(tuned || base) per token on the general set
    gate        the publish gate's verdict: recorded in a published version's manifest (extra.gate), or
                measured now for a run that was not published (a refused job)

Everything is read from the on-disk contract (RunDir, Manifest); a run folder that is gone leaves the
manifest's summary (no categories, no examples).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from artifacts.gate import GatePolicy, check
from artifacts.run_dir import RunDir

LOST_EXAMPLES = 20  # enough to see what kind of knowledge went, small enough for one page


@dataclass
class Score:
    base: float | None
    tuned: float | None
    ratio: float | None  # tuned / base: 1.0 kept everything


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    forced: bool
    override_reason: str | None


@dataclass
class Evidence:
    task: dict[str, Any] | None  # {metric, base, tuned, gain}; gain in points
    retention: dict[str, Any] | None  # {overall: Score, by_category: {cat: Score}, lost_examples: [...]}
    kl: float | None
    gate: Verdict | None

    def public(self) -> dict[str, Any]:
        return asdict(self)


def _score(d: dict[str, Any]) -> Score:
    base, tuned = d.get("base"), d.get("tuned")
    return Score(base, tuned, None if not base or tuned is None else tuned / base)


def lost_examples(path: Path, limit: int = LOST_EXAMPLES) -> list[dict[str, Any]]:
    """General-set answers the base got right and the tuned model got wrong (retention_predictions.jsonl)."""
    out: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return out
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("base_correct") and not r.get("tuned_correct"):
            out.append({"category": r.get("category"), "prompt": r.get("prompt"), "base_answer": r.get("base"),
                        "tuned_answer": r.get("tuned")})
            if len(out) >= limit:
                break
    return out


def _retention(summary: dict[str, Any] | None, full: dict[str, Any] | None, rd: RunDir | None) -> dict | None:
    report = full or summary
    if not report:
        return None
    cats = (full or {}).get("by_category") or {}
    return {"overall": _score(report), "by_category": {c: _score(v) for c, v in sorted(cats.items())},
            "lost_examples": lost_examples(rd.retention_predictions) if rd is not None else []}


def _eval(rd: RunDir | None) -> dict[str, Any]:
    try:
        return json.loads(rd.eval.read_text(encoding="utf-8")) if rd is not None else {}
    except (OSError, ValueError):
        return {}


def gate_verdict(metrics: dict[str, Any], recorded: dict[str, Any] | None, policy: GatePolicy) -> Verdict:
    """The verdict a publish recorded; else (never published) what the gate says now under `policy`."""
    if recorded and "passed" in recorded:
        return Verdict(bool(recorded["passed"]), list(recorded.get("reasons") or []), bool(recorded.get("forced")),
                       recorded.get("override_reason"))
    res = check(metrics, policy)
    return Verdict(res.passed, list(res.reasons), False, None)


def evidence(metrics: dict[str, Any], run: Path | None, recorded_gate: dict[str, Any] | None = None,
             policy: GatePolicy | None = None) -> Evidence | None:
    """Evidence from a manifest's `metrics` and, where still on disk, its run folder; None without any evaluation."""
    rd = RunDir(run) if run is not None and Path(run).is_dir() else None
    ev = _eval(rd)
    head = ev.get("headline") or metrics.get("headline")
    ret = _retention(metrics.get("retention"), ev.get("retention"), rd)
    if not head and not ret:
        return None
    task = {"metric": head.get("metric"), "base": head.get("base"), "tuned": head.get("tuned"),
            "gain": head.get("gain_points")} if head else None
    kl = (ev.get("retention") or metrics.get("retention") or {}).get("kl")
    gate_metrics = {"headline": head, "retention": ev.get("retention") or metrics.get("retention")}
    return Evidence(task, ret, kl, gate_verdict(gate_metrics, recorded_gate, policy or GatePolicy()))
