"""A run's metrics series, read from its logs/metrics.jsonl (the Trainer's log history, one JSON line per log).

Train writes the file while it trains (train/reporting.py JsonlMetrics); the fine-tuning API and the console
read it here, live: a line being written is skipped, and the series grows as the run logs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class MetricsPoint:
    """One step: the training loss, the validation loss and the learning rate logged at it (None: not logged)."""

    step: int
    epoch: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    learning_rate: float | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


# the Trainer's log keys -> the series' fields; `train_loss` of the Trainer's last log is a whole-run mean, not a point
KEYS = {"loss": "train_loss", "eval_loss": "valid_loss", "learning_rate": "learning_rate"}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def read_series(path: Path) -> list[MetricsPoint]:
    """One point per logged step, oldest first; logs of one step (train, then eval) are merged."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []
    points: dict[int, MetricsPoint] = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line being written, or cut by a crash
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not set(KEYS) & set(row):
            continue
        pt = points.setdefault(row["step"], MetricsPoint(row["step"]))
        pt.epoch = _number(row.get("epoch")) if pt.epoch is None else pt.epoch
        for key, name in KEYS.items():
            if _number(row.get(key)) is not None:
                setattr(pt, name, _number(row[key]))
    return [points[s] for s in sorted(points)]
