"""The publish gate: a registry entry must beat its base on its task and keep what the base knew.

Both numbers come from the manifest's `metrics`, written by the training run's evaluation:

    metrics.headline   {"metric", "base", "tuned", "gain_points"}  task metric, base vs tuned
    metrics.retention  {"base", "tuned", "drop_points", "kl", ...}   the general set, base vs tuned

`tunestack registry publish`, the recipe's auto-publish and `tunestack export all --registry` all go
through `Registry`, which calls `check` and refuses with `GateRefused` (one line, both numbers) unless
overridden with a reason (`--override-gate REASON`); what was decided, with the thresholds and the
reason, is recorded in the published manifest (`extra.gate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GatePolicy:
    min_gain: float = 1.0  # points: an adapter that learnt nothing measurable is not worth serving
    max_retention_drop: float = 10.0  # points of general-set accuracy the tuned model may lose vs its base


@dataclass
class GateResult:
    policy: GatePolicy
    task_metric: str | None
    task_gain: float | None  # points
    retention_base: float | None  # accuracy in points
    retention_tuned: float | None
    reasons: list[str] = field(default_factory=list)
    override_reason: str | None = None  # why a refused publish went ahead (--override-gate REASON)

    @property
    def forced(self) -> bool:
        return self.override_reason is not None

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def retention_drop(self) -> float | None:
        if self.retention_base is None or self.retention_tuned is None:
            return None
        return self.retention_base - self.retention_tuned

    def numbers(self) -> str:
        """Both numbers against both thresholds, for a refusal line or a listing."""
        gain = "n/a" if self.task_gain is None else f"{self.task_gain:+.1f}"
        drop = "n/a" if self.retention_drop is None else f"{self.retention_drop:.1f}"
        ret = ("" if self.retention_base is None or self.retention_tuned is None
               else f" ({self.retention_base:.1f} -> {self.retention_tuned:.1f} %)")
        return (f"task gain {gain} points ({self.task_metric or 'no task metric'}; min_gain {self.policy.min_gain:g}), "
                f"retention drop {drop} points{ret} (max_retention_drop {self.policy.max_retention_drop:g})")

    def record(self) -> dict[str, Any]:
        """What goes into the published manifest's extra.gate."""
        return {**asdict(self.policy), "task_metric": self.task_metric, "task_gain": self.task_gain,
                "retention_base": self.retention_base, "retention_tuned": self.retention_tuned,
                "retention_drop": self.retention_drop, "passed": self.passed, "forced": self.forced,
                "override_reason": self.override_reason, "reasons": list(self.reasons)}


class GateRefused(ValueError):
    """The gate refused a publish; the message is one line with both numbers."""


def _points(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def check(metrics: dict[str, Any], policy: GatePolicy) -> GateResult:
    """Measure a manifest's metrics against the policy; a missing measurement is a refusal, never a pass."""
    head = metrics.get("headline") or {}
    ret = metrics.get("retention") or {}
    res = GateResult(policy, head.get("metric"), head.get("gain_points"),
                     _points(ret.get("base")), _points(ret.get("tuned")))
    if res.task_gain is None:
        res.reasons.append("no base-vs-tuned task metric (run with eval.enabled and eval.compare_base)")
    elif res.task_gain < policy.min_gain:
        res.reasons.append("task gain below min_gain")
    if res.retention_drop is None:
        res.reasons.append("no retention measurement (run with eval.retention)")
    elif res.retention_drop > policy.max_retention_drop:
        res.reasons.append("retention dropped more than max_retention_drop")
    return res


def enforce(metrics: dict[str, Any], policy: GatePolicy, name: str, override: str | None = None) -> GateResult:
    """check(); raise GateRefused (one line) unless it passed or `override` (a reason) overrides; the reason is recorded."""
    if override is not None and not override.strip():
        raise GateRefused(f"refusing to publish {name!r}: overriding the gate needs a reason (--override-gate REASON)")
    res = check(metrics, policy)
    if not res.passed:
        if override is None:
            raise GateRefused(f"refusing to publish {name!r}: {'; '.join(res.reasons)}: {res.numbers()}; "
                              f"--override-gate REASON (publish.override_gate) publishes it anyway, recording the reason")
        res.override_reason = override.strip()
    return res
