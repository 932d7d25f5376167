"""What a fine-tuning job's run produced, over HTTP: its loss series, its evidence, and publishing it.

    GET  /v1/fine_tuning/jobs/{id}/metrics      the run's metrics series, growing live while it trains
    GET  /v1/fine_tuning/jobs/{id}/evaluation   the run's evidence (404 until the run has evaluated)
    POST /v1/fine_tuning/jobs/{id}/publish      {"override_reason": str|null}: publish a run the gate refused (admin)

The run folder is the worker's (JobStore.run_dir); its config.yaml holds the gate policy it ran under, so a
publish here applies the same gate as the run's own auto-publish, and an override is recorded in the manifest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import yaml
from flask import Flask, Response, request

from artifacts import GatePolicy, GateRefused, Manifest, ManifestError, Registry, RegistryError, RunDir
from artifacts.evidence import evidence
from artifacts.finetune import Job
from artifacts.run_metrics import read_series
from serve.errors import APIError, bad_request
from serve.finetune.api import FineTuneAPI
from serve.finetune.protocol import PublishRequest


def _publish_config(rd: RunDir) -> tuple[GatePolicy, int]:
    """The gate policy and kept versions the run was configured with (its resolved config.yaml)."""
    try:
        pub = (yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}).get("publish") or {}
        return GatePolicy(float(pub["min_gain"]), float(pub["max_retention_drop"])), int(pub["keep_versions"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError):
        return GatePolicy(), 5  # artifacts' defaults, equal to train's PublishConfig defaults


class JobResults:
    def __init__(self, api: FineTuneAPI, registry: Path):
        self.api, self.registry = api, Registry(registry)

    def _job(self, jid: str) -> tuple[Job, RunDir]:
        job = self.api._found(lambda: self.api.jobs.get(jid, self.api.reader()))
        return job, RunDir(self.api.jobs.run_dir(jid))

    def metrics(self, jid: str) -> dict[str, Any]:
        _, rd = self._job(jid)
        return {"object": "list", "data": [p.public() for p in read_series(rd.metrics_log)]}

    def _recorded_gate(self, job: Job, rd: RunDir) -> dict[str, Any] | None:
        """The gate a publish of this run recorded (None: the run was not published)."""
        for v in self.registry.versions("adapters", job.spec.adapter_name) if job.spec.adapter_name else []:
            if v.manifest is not None and v.manifest.extra.get("run") == str(rd.root.resolve()):
                return v.manifest.extra.get("gate")
        return None

    def evaluation(self, jid: str) -> dict[str, Any]:
        job, rd = self._job(jid)
        if not rd.eval.is_file():
            raise APIError(404, f"job {jid} has not evaluated yet (status {job.status})", None, "not_evaluated")
        try:
            metrics = Manifest.read(rd.root).metrics
        except ManifestError:
            metrics = {}  # evaluated, not yet recorded: eval.json has it all
        ev = evidence(metrics, rd.root, self._recorded_gate(job, rd), _publish_config(rd)[0])
        if ev is None:
            raise APIError(404, f"job {jid}'s run has no evaluation", None, "not_evaluated")
        return ev.public()

    def publish(self, jid: str, body: Any) -> dict[str, Any]:
        """Publish a finished run that was not published (the gate refused it), with the reason recorded."""
        reason = PublishRequest.parse(body).override_reason
        job, rd = self._job(jid)
        if job.status != "failed" or not rd.is_finished() or self._recorded_gate(job, rd) is not None:
            raise bad_request(f"job {jid} ({job.status}) has no finished, unpublished run to publish",
                              "fine_tuning_job_id", "not_publishable")
        policy, keep = _publish_config(rd)
        try:
            self.registry.publish_run(rd.root, job.spec.adapter_name, gate=policy, override_gate=reason, keep=keep)
        except GateRefused as e:
            raise bad_request(str(e), "override_reason", "gate_refused") from None
        except RegistryError as e:
            raise bad_request(str(e), "fine_tuning_job_id", "not_publishable") from None
        job.status, job.error, job.fine_tuned_model = "succeeded", None, job.spec.fine_tuned_model
        job.finished_at = job.finished_at or int(time.time())
        self.api.jobs.save(job)
        note = f"gate overridden: {reason}" if reason else "gate passed"
        self.api.jobs.event(jid, f"Published {job.fine_tuned_model} ({note})", data={"override_reason": reason})
        return job.public()


def routes(app: Flask, api: FineTuneAPI, registry: Path, json_body: Callable[[bytes], Any],
           respond: Callable[..., Response]) -> None:
    res = JobResults(api, registry)
    app.add_url_rule("/v1/fine_tuning/jobs/<jid>/metrics", "jobs_metrics",
                     lambda jid: respond(res.metrics(jid)), methods=["GET"])
    app.add_url_rule("/v1/fine_tuning/jobs/<jid>/evaluation", "jobs_evaluation",
                     lambda jid: respond(res.evaluation(jid)), methods=["GET"])
    app.add_url_rule("/v1/fine_tuning/jobs/<jid>/publish", "jobs_publish",
                     lambda jid: respond(res.publish(jid, json_body(request.get_data(cache=False)))),
                     methods=["POST"])
