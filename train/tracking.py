"""Experiment tracking: which trackers a run reports to (training.report_to), and its evaluation logged to them.

    check(cfg)                            before any write: a missing client or MLflow server is a ConfigError
    trackers = open_trackers(cfg, rd)     after the run directory is written: the trackers' runs start
    trackers.callbacks()                  transformers' own TensorBoardCallback / MLflowCallback / WandbCallback
    trackers.log_evaluation(ev, gate)     after eval.json: task base vs tuned, retention overall and by category,
                                          KL, the gate's verdict, into the same runs as the step metrics
    trackers.finish(ok)                   ends the MLflow / W&B runs (FINISHED or FAILED)

The MLflow and W&B runs are started here, before the Trainer: transformers' callbacks find the run already
active, log the step metrics into it and leave it open, so the evaluation (scored after training) lands in
the same run. The runs' ids are written to logs/tracking.json. A --resume starts new tracker runs (the
TensorBoard curve continues in the same log dir); the metrics.jsonl of the run directory stays the record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from artifacts import GateResult, RunDir, atomic_write_text
from artifacts.gate import check as gate_check
from lm.errors import ConfigError
from train import reporting
from train.config import Config, PublishConfig

EXTRA = "tracking"  # the pyproject extra holding the MLflow and W&B clients
DEFAULT_EXPERIMENT = "tunestack"  # tracking.experiment's fallback when neither config nor environment names one


class Tracker(Protocol):
    name: str

    def callback(self) -> Any: ...

    def log(self, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None: ...

    def finish(self, ok: bool) -> None: ...

    def ref(self) -> dict[str, Any]: ...


def _require(tracker: str, module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"config: training.report_to: {tracker} needs the {module} client, not installed: "
                          f"pip install 'tunestack[{EXTRA}]'") from None


def _mlflow_uri(cfg: Config) -> str | None:
    return cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def check(cfg: Config) -> None:
    """Exit 2 (ConfigError) before anything is written: a chosen tracker's client missing, or MLflow without a server
    (MLflow 3 refuses its file store, and a local sqlite store needs the full mlflow package, not the client)."""
    for name, module in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if name in cfg.training.report_to:
            _require(name, module)
    if "mlflow" in cfg.training.report_to and not _mlflow_uri(cfg):
        raise ConfigError("config: training.report_to: mlflow needs a tracking server: set tracking.mlflow_uri "
                          "(e.g. http://localhost:5000) or MLFLOW_TRACKING_URI")


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as `section.field` params (method.r, training.lr...), as the trackers display them."""
    return {f"{sec}.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for sec, values in cfg.to_dict().items() for k, v in values.items()}


def evaluation_metrics(ev: dict[str, Any], gate: GateResult | None) -> dict[str, float]:
    """eval.json and the gate's verdict as flat scalars: one name per figure, the same in every tracker."""
    out: dict[str, float] = {}
    for side in ("base", "tuned"):
        out |= {f"eval/{side}/{k}": float(v) for k, v in (ev.get(side) or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if head := ev.get("headline"):
        out |= {"task/base": head["base"], "task/tuned": head["tuned"], "task/gain_points": head["gain_points"]}
    if ret := ev.get("retention"):
        out |= {"retention/base": ret["base"], "retention/tuned": ret["tuned"], "retention/drop_points": ret["drop_points"]}
        if ret.get("kl") is not None:
            out["retention/kl"] = ret["kl"]
        for cat, v in (ret.get("by_category") or {}).items():
            out |= {f"retention/{cat}/base": v["base"], f"retention/{cat}/tuned": v["tuned"]}
    if gate is not None:
        out |= {"gate/passed": float(gate.passed), "gate/forced": float(gate.forced)}
    return {k: float(v) for k, v in out.items()}


def gate_tags(ev: dict[str, Any], gate: GateResult | None) -> dict[str, str]:
    tags = {"task.metric": str((ev.get("headline") or {}).get("metric"))}
    if gate is not None:
        tags |= {"gate.passed": str(gate.passed).lower(), "gate.reasons": "; ".join(gate.reasons) or "none",
                 "gate.override_reason": gate.override_reason or ""}
    return tags


class TensorBoardTracker:
    """transformers' TensorBoard callback into logs/tensorboard; the evaluation as scalars in the same dir."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir

    def callback(self):
        return reporting.TensorBoard(self.log_dir)

    def log(self, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.log_dir)) as w:
            for k, v in metrics.items():
                w.add_scalar(k, v, step)
            w.add_text("gate", "\n".join(f"{k}: {v}" for k, v in tags.items()), step)

    def finish(self, ok: bool) -> None:
        pass

    def ref(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir)}


class MlflowTracker:
    """An MLflow run started here; transformers' MLflowCallback logs the steps into it and leaves it open."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, str], run_dir: Path):
        self.mlflow = mlflow = _require("mlflow", "mlflow")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name, tags={"tunestack.run_dir": str(run_dir)})
        self.uri, self.experiment = uri, experiment
        self.client = mlflow.MlflowClient(uri)
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        items = [mlflow.entities.Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run.info.run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def callback(self):
        from transformers.integrations import MLflowCallback

        return MLflowCallback()

    def log(self, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        stamp = int(1000 * time.time())
        self.client.log_batch(self.run.info.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])

    def finish(self, ok: bool) -> None:
        if self.mlflow.active_run() is not None and self.mlflow.active_run().info.run_id == self.run.info.run_id:
            self.mlflow.end_run(status="FINISHED" if ok else "FAILED")

    def ref(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run.info.run_id}


class WandbTracker:
    """A W&B run started here (WANDB_MODE, WANDB_API_KEY... are wandb's own); WandbCallback logs into it."""

    name = "wandb"

    def __init__(self, project: str, run_name: str, config: dict[str, Any], logs: Path):
        wandb = _require("wandb", "wandb")
        logs.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(logs), config=config, reinit="finish_previous")

    def callback(self):
        from transformers.integrations import WandbCallback

        return WandbCallback()

    def log(self, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        self.run.log({**metrics, "train/global_step": step})
        self.run.summary.update({**metrics, **tags})

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def ref(self) -> dict[str, Any]:
        return {"project": self.run.project, "run_id": self.run.id, "dir": self.run.dir}


@dataclass
class Trackers:
    """The run's trackers, rank 0 only (other torchrun ranks log nothing)."""

    items: list[Tracker] = field(default_factory=list)
    path: Path | None = None  # logs/tracking.json

    def callbacks(self) -> list:
        return [t.callback() for t in self.items]

    def write_refs(self) -> None:
        if self.path is not None and self.items:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({t.name: t.ref() for t in self.items}, indent=2) + "\n")

    def log_evaluation(self, ev: dict[str, Any], manifest_metrics: dict[str, Any], publish: PublishConfig) -> None:
        """eval.json and the gate's verdict, measured as a publish would (override_gate included)."""
        gate = gate_check(manifest_metrics, publish.policy())
        if not gate.passed and publish.override_gate:
            gate.override_reason = publish.override_gate
        metrics, tags = evaluation_metrics(ev, gate), gate_tags(ev, gate)
        for t in self.items:
            t.log(metrics, int(ev.get("train_steps") or 0), tags)

    def finish(self, ok: bool) -> None:
        for t in self.items:
            t.finish(ok)
        self.items = []


def _experiment(cfg: Config, env: str) -> str:
    return cfg.tracking.experiment or os.environ.get(env) or DEFAULT_EXPERIMENT


def open_trackers(cfg: Config, rd: RunDir, is_main: bool = True) -> Trackers:
    """Start the chosen trackers (training.report_to; `none`: no tracker, metrics.jsonl only)."""
    chosen = [n for n in cfg.training.report_to if n != "none"]
    check(cfg)
    if not is_main:
        return Trackers()
    name, params = cfg.tracking.run_name or rd.root.name, flat_params(cfg)
    out = Trackers(path=rd.logs / "tracking.json")
    starts = {"tensorboard": lambda: TensorBoardTracker(rd.tensorboard),
              "mlflow": lambda: MlflowTracker(_mlflow_uri(cfg), _experiment(cfg, "MLFLOW_EXPERIMENT_NAME"), name, params,
                                              rd.root),
              "wandb": lambda: WandbTracker(_experiment(cfg, "WANDB_PROJECT"), name, cfg.to_dict(), rd.logs)}
    try:
        for tracker in chosen:
            try:
                out.items.append(starts[tracker]())
            except Exception as e:  # noqa: BLE001  (each client raises its own types: a server down, a login missing)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"config: training.report_to: {tracker}: its run did not start: {first[:300]}") from None
    except BaseException:
        out.finish(ok=False)  # a tracker that cannot start leaves none of the others' runs open
        raise
    out.write_refs()
    return out
