"""The Kubernetes runner: each fine-tuning job becomes a batch/v1 Job, from k8s/'s own training Job template.

The serving pod's ServiceAccount may create Jobs in its namespace and do nothing else (the Role in
k8s/components/finetune-jobs). The Job's pod runs `tunestack train worker --job ID` on the shared
registry volume: it writes the job's status, events and checkpoints there, watches the cancel flag,
and publishes the adapter, exactly as the local worker does. So the API needs no read access to
the cluster; a pod that never starts leaves its job `queued` (`kubectl describe job` says why).

No API server runs on the machines this was built on: the Job objects are checked with the same
strict schema validation as k8s/, and the calls against the kubernetes client's recorded REST
contract (tests/serve/test_k8s_runner.py); no cluster has run it yet.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

import yaml

from artifacts.finetune import Job

LABEL = "tunestack.dev/fine-tuning-job"


class JobsAPI(Protocol):
    """The one call the runner makes: kubernetes.client.BatchV1Api.create_namespaced_job."""

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> Any: ...


def job_object(template: dict[str, Any], job: Job, registry_mount: str = "/data/registry") -> dict[str, Any]:
    """The training Job template with this job's name, labels and worker command."""
    obj = copy.deepcopy(template)
    short = job.id.split("-", 1)[1][:12]
    obj["metadata"]["name"] = f"tunestack-ft-{short}"
    obj["metadata"].setdefault("labels", {})[LABEL] = job.id
    spec = obj["spec"]
    spec["backoffLimit"] = 2  # a retried pod resumes the job from its last checkpoint
    spec["ttlSecondsAfterFinished"] = 86400  # the job's record lives in the registry; the Job object need not
    pod = spec["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {})[LABEL] = job.id
    container = pod["spec"]["containers"][0]
    container["args"] = ["tunestack", "train", "worker", "--registry", registry_mount, "--job", job.id]
    return obj


class K8sRunner:
    def __init__(self, template_path: Path, namespace: str, api: JobsAPI | None = None):
        self.template = yaml.safe_load(Path(template_path).read_text())
        if self.template.get("kind") != "Job":
            raise ValueError(f"{template_path}: expected a batch/v1 Job template, got {self.template.get('kind')!r}")
        self.namespace = namespace
        self._api = api

    def api(self) -> JobsAPI:
        if self._api is None:
            from kubernetes import client, config  # the `k8s` extra; in-cluster credentials of the serving pod

            config.load_incluster_config()
            self._api = client.BatchV1Api()
        return self._api

    def submit(self, job: Job) -> str:
        body = job_object(self.template, job)
        self.api().create_namespaced_job(self.namespace, body)
        return body["metadata"]["name"]
