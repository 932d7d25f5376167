"""The Kubernetes runner: the Job objects it creates, the one API call it makes, and the RBAC it needs.

No API server runs here, so the Job is validated with the same strict schema check as k8s/, and the
call goes through the real kubernetes client down to its REST layer, where the request is recorded.
"""

from __future__ import annotations

import json
import subprocess

import kubernetes_validate
import yaml

from artifacts.finetune import FileStore, Hyperparameters, Job, JobSpec, JobStore
from serve.finetune.api import FineTuneAPI
from serve.finetune.k8s_runner import LABEL, K8sRunner, job_object
from tests.conftest import DEMO_TRAIN, ROOT

K8S = ROOT / "k8s"
TEMPLATE = K8S / "components" / "finetune-jobs" / "train-job-template.yaml"


def _render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _job() -> Job:
    return Job("ftjob-0123456789abcdef01234567", "tiny", "file-x", 0, status="queued",
               spec=JobSpec("lora", Hyperparameters(), [], "ft-01234567", "ft:tiny::01234567"))


def test_the_template_is_the_gpu_overlays_training_job():
    rendered = next(d for d in _render("gpu") if d["kind"] == "Job")
    assert yaml.safe_load(TEMPLATE.read_text()) == rendered, "regenerate train-job-template.yaml (see its header)"


def test_each_job_becomes_a_valid_job_with_the_gpu_resources_and_the_worker_command():
    obj = job_object(yaml.safe_load(TEMPLATE.read_text()), _job())
    kubernetes_validate.validate(obj, "1.32.0", strict=True)
    assert obj["metadata"]["name"] == "tunestack-ft-0123456789ab" and len(obj["metadata"]["name"]) <= 63
    pod = obj["spec"]["template"]
    assert pod["metadata"]["labels"][LABEL] == obj["metadata"]["labels"][LABEL] == _job().id
    c = pod["spec"]["containers"][0]
    assert c["args"] == ["tunestack", "train", "worker", "--registry", "/data/registry", "--job", _job().id]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert any(v["persistentVolumeClaim"]["claimName"] == "tunestack-registry"
               for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)


class _Recorded:
    """The kubernetes client's REST response, as the API server answers a create (201)."""

    def __init__(self, body: dict):
        self.status, self.reason, self.data = 201, "Created", json.dumps(body).encode()
        self.headers = {"content-type": "application/json"}

    def getheaders(self):
        return {"content-type": "application/json"}

    def getheader(self, name, default=None):
        return self.getheaders().get(name.lower(), default)

    def read(self):
        return self.data


def test_submit_makes_one_create_call_with_the_job_body():
    from kubernetes import client

    calls = []
    api_client = client.ApiClient(client.Configuration(host="https://k8s.invalid"))

    def request(method, url, headers=None, body=None, post_params=None, _request_timeout=None):
        calls.append((method, url, body))
        return _Recorded(body)

    api_client.rest_client.request = request
    runner = K8sRunner(TEMPLATE, "tunestack", api=client.BatchV1Api(api_client))
    name = runner.submit(_job())
    assert name == "tunestack-ft-0123456789ab"
    [(method, url, body)] = calls
    assert method == "POST" and url == "https://k8s.invalid/apis/batch/v1/namespaces/tunestack/jobs"
    assert body == job_object(yaml.safe_load(TEMPLATE.read_text()), _job())


def test_the_serving_account_may_create_jobs_and_nothing_else():
    docs = _render("gpu-finetune")
    [role] = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]}]
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tunestack-serve", "namespace": "tunestack"}]
    serve = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in serve["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SERVE_FINETUNE_WORKER"]["value"] == "k8s"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] in ("Role", "RoleBinding")} == {"tunestack"}
    for d in docs:
        if d["kind"] in ("Role", "RoleBinding", "ServiceAccount", "Deployment", "ConfigMap"):
            kubernetes_validate.validate(d, "1.32.0", strict=True)


def test_a_runner_that_cannot_start_the_job_fails_it_instead_of_the_request(tmp_path):
    src = tmp_path / "menu.jsonl"
    src.write_bytes(DEMO_TRAIN.read_bytes())
    fid = FileStore(tmp_path).add(src, "menu.jsonl", "fine-tune", None).id

    def refuse(job):
        raise RuntimeError("jobs.batch is forbidden: User cannot create resource")

    api = FineTuneAPI(tmp_path, lambda: "tiny", 1 << 20, "", submit=refuse)
    out = api.create_job({"model": "tiny", "training_file": fid})
    assert out["status"] == "failed" and out["error"]["code"] == "runner_error"
    assert "forbidden" in JobStore(tmp_path).events(out["id"])[0]["message"]
