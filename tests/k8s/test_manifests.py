"""Offline checks of the Kubernetes manifests in k8s/ (no API server needed).

Every overlay is rendered once with `kubectl kustomize`, then:
  * built-in objects are validated strictly against the Kubernetes 1.32 OpenAPI schemas
    (kubernetes-validate); ServiceMonitor and ScaledObject against pydantic models generated
    from their CRDs (cloudcoil: Prometheus Operator 0.80.1, KEDA 2.16.1), made strict below;
  * cross-object invariants that no schema can see are asserted (selectors, references, ports,
    GPU resources, security context, the shared registry volume, autoscaling wiring).
Each validator is also fed a deliberately broken object, to prove it is really rejecting things.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["gpu", "cpu", "gpu-multinode"]
GPU_OVERLAYS = {"gpu", "gpu-multinode"}
K8S_VERSION = "1.32.0"
NAMESPACE = "tunestack"
IMAGE_RE = re.compile(r"^ghcr\.io/tunestack/tunestack-(train|export|serve-vllm|serve-flask):(\d+\.\d+\.\d+)$")
# Secrets the user creates with `kubectl create secret` (README): never rendered, so no real key
# can end up in git. Maps name -> keys the manifests reference.
USER_SECRETS = {"tunestack-serve-keys": {"api-key", "admin-key"}}
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet")
GPU = "nvidia.com/gpu"
VLLM_CHILD_STOP_S = 20  # serve/vllm/child.py waits this long for the vLLM child after SIGTERM


# ----------------------------------------------------------------------------- rendering

def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH: these tests render k8s/ with `kubectl kustomize` (install kubectl >= 1.27)"
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    """(overlay name, rendered objects), rendered once per overlay for the whole module."""
    return request.param, kustomize(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def base_docs():
    return kustomize(K8S / "base")


def objs(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def templates(docs):
    """(workload, pod template) for every pod-creating object."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in WORKLOADS]


def containers(template):
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def component(obj):
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def serve_deployment(docs):
    [dep] = [d for d in objs(docs, "Deployment") if component(d) == "serve"]
    return dep


def train_job(docs):
    [job] = [d for d in objs(docs, "Job") if component(d) == "train"]
    return job


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def quantity(q) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and (m[2] in units or m[2] == ""), f"unparseable quantity {q!r}"
    return float(m[1]) * units.get(m[2], 1)


# ----------------------------------------------------------------------------- schema validation

def test_builtin_objects_validate_strictly(overlay):
    name, docs = overlay
    errors = []
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except Exception as e:  # ValidationError, SchemaNotFoundError (unknown kind/apiVersion)
            errors.append(f"{d['kind']}/{d['metadata'].get('name')}: {getattr(e, 'message', e)}")
    assert not errors, f"overlay {name}: invalid for Kubernetes {K8S_VERSION}:\n" + "\n".join(errors)


def test_only_known_crds_are_used(overlay):
    _, docs = overlay
    custom = {(d["apiVersion"], d["kind"]) for d in docs if "." in d["apiVersion"].split("/")[0]
              and not d["apiVersion"].split("/")[0].endswith(".k8s.io")}
    assert custom <= CRD_KINDS, f"custom resources without a validator: {custom - CRD_KINDS}"


def test_kubernetes_validate_rejects_broken_objects(overlay):
    _, docs = overlay
    dep = copy.deepcopy(serve_deployment(docs))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolice"):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    pvc = copy.deepcopy(one(docs, "PersistentVolumeClaim", "tunestack-registry"))
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # must be a list
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)


def _diff(want, got, path="") -> str | None:
    """First place where `got` (the model's dump) differs from `want` (the manifest)."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in want:
            if k not in got:
                return f"{path}.{k}: unknown field (dropped by the model)"
            if (d := _diff(want[k], got[k], f"{path}.{k}")) is not None:
                return d
        return None
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return next((d for i, (w, g) in enumerate(zip(want, got)) if (d := _diff(w, g, f"{path}[{i}]"))), None)
    return None if (want == got and type(want) is type(got)) else f"{path}: {want!r} was read as {got!r}"


def validate_crd(model, doc: dict) -> None:
    """Validate with a cloudcoil model, strictly: pydantic ignores unknown fields and coerces
    types ("8" -> 8), so the dump must also round-trip to exactly the manifest."""
    obj = model.model_validate(doc)  # raises pydantic.ValidationError on wrong types/required fields
    got = obj.model_dump(mode="json", by_alias=True, exclude_unset=True)
    problem = _diff(doc, got)
    if problem:
        raise ValueError(f"{doc['kind']}/{doc['metadata']['name']}: {problem}")


def test_servicemonitor_validates(overlay):
    _, docs = overlay
    for sm in objs(docs, "ServiceMonitor"):
        validate_crd(ServiceMonitor, sm)


def test_scaledobject_validates(overlay):
    _, docs = overlay
    for so in objs(docs, "ScaledObject"):
        validate_crd(ScaledObject, so)
        for trig in so["spec"]["triggers"]:
            # Trigger metadata is a free string map in the CRD; the prometheus scaler needs these.
            assert trig["type"] == "prometheus"
            assert {"serverAddress", "query", "threshold"} <= trig["metadata"].keys()
            assert all(isinstance(v, str) for v in trig["metadata"].values()), "trigger metadata values are strings"
            float(trig["metadata"]["threshold"])


@pytest.mark.parametrize("model,kind,breakage", [
    (ServiceMonitor, "ServiceMonitor", lambda s: s["spec"]["endpoints"][0].update(intervall="15s")),
    (ServiceMonitor, "ServiceMonitor", lambda s: s["spec"].update(endpoints="http")),
    (ScaledObject, "ScaledObject", lambda s: s["spec"].update(maxReplicas=4)),
    (ScaledObject, "ScaledObject", lambda s: s["spec"].update(minReplicaCount="one")),
    (ScaledObject, "ScaledObject", lambda s: s["spec"].pop("scaleTargetRef")),
])
def test_crd_validators_reject_broken_objects(base_docs, model, kind, breakage):
    [doc] = copy.deepcopy(objs(base_docs, kind))
    validate_crd(model, doc)  # the unbroken one passes
    breakage(doc)
    with pytest.raises(ValueError):  # pydantic.ValidationError is a ValueError
        validate_crd(model, doc)


# ----------------------------------------------------------------------------- cross-object checks

def test_namespace_and_common_labels(overlay):
    _, docs = overlay
    for d in docs:
        labels = d["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "tunestack", d["metadata"]["name"]
        assert labels.get("app.kubernetes.io/part-of") == "tunestack", d["metadata"]["name"]
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"
            assert component(d) in ("serve", "train"), f"{d['kind']}/{d['metadata']['name']} lacks a component label"
    for w, t in templates(docs):
        assert component(t) == component(w), f"{w['metadata']['name']}: pod template component label"


def test_workload_selectors_match_templates(overlay):
    _, docs = overlay
    for w, t in templates(docs):
        sel = w["spec"].get("selector")
        if w["kind"] == "Job":
            assert not w["spec"].get("manualSelector") and sel is None, "let the Job controller pick its selector"
            continue
        assert set(sel) == {"matchLabels"}, "matchLabels only"
        assert selects(sel["matchLabels"], t["metadata"]["labels"]), f"{w['metadata']['name']}: selector/template"


def test_services_select_pods_and_target_existing_ports(overlay):
    _, docs = overlay
    for svc in objs(docs, "Service"):
        matched = [t for _, t in templates(docs) if selects(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert matched, f"Service {svc['metadata']['name']} selects no pod template"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for t in matched:
                cports = [p for c in t["spec"]["containers"] for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in cports), \
                    f"Service {svc['metadata']['name']} targetPort {target} is not a container port"


def test_probe_ports_exist(overlay):
    _, docs = overlay
    for w, t in templates(docs):
        for c in containers(t):
            names = {p.get("name") for p in c.get("ports", [])}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                port = action["port"] if action else None
                assert port in names or port in numbers, f"{c['name']}.{kind}: port {port!r} not declared"


def test_serve_probes(overlay):
    name, docs = overlay
    [c] = serve_deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    start = c["startupProbe"]
    assert start["httpGet"]["path"] in ("/health", "/ready")
    grace = start["failureThreshold"] * start.get("periodSeconds", 10)
    assert grace >= (600 if name in GPU_OVERLAYS else 120), f"startup grace {grace}s is too short for {name}"


def _configmap_env(docs, prefix: str = "tunestack-serve") -> dict[str, str]:
    [cm] = [o for o in objs(docs, "ConfigMap") if o["metadata"]["name"].startswith(prefix)]
    return cm["data"]


def test_shutdown_budget_fits_the_grace_period(overlay):
    """preStop sleep + the server's drain + the worker's stop (+ the vLLM child's stop) <= the grace period,
    so SIGKILL never cuts a request the drain promised to finish (tests/reliability/test_drain.py)."""
    from serve.process.gunicorn import STOP_MARGIN_S
    from serve.settings import Settings

    name, docs = overlay
    spec = serve_deployment(docs)["spec"]["template"]["spec"]
    [c] = spec["containers"]
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep", pre
    env = _configmap_env(docs)
    drain = Settings.from_env({k: v for k, v in env.items() if k.startswith("SERVE_")}).drain_seconds
    child_stop = VLLM_CHILD_STOP_S if env.get("SERVE_BACKEND") == "vllm" else 0
    budget = int(pre[1]) + drain + STOP_MARGIN_S + child_stop
    assert 5 <= int(pre[1]) and drain >= 10, (pre, drain)
    assert budget <= spec["terminationGracePeriodSeconds"], (name, budget, spec["terminationGracePeriodSeconds"])


def test_references_exist(overlay):
    _, docs = overlay
    have = {k: {d["metadata"]["name"] for d in objs(docs, k)}
            for k in ("ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount")}
    used = {k: set() for k in have}
    secret_keys: dict[str, set] = {}
    for _, t in templates(docs):
        spec = t["spec"]
        used["ServiceAccount"].add(spec.get("serviceAccountName", "default"))
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                used["PersistentVolumeClaim"].add(v["persistentVolumeClaim"]["claimName"])
            if "configMap" in v:
                used["ConfigMap"].add(v["configMap"]["name"])
            if "secret" in v:
                used["Secret"].add(v["secret"]["secretName"])
        for c in containers(t):
            for src in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in src:
                        used[kind].add(src[key]["name"])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    used["ConfigMap"].add(ref["configMapKeyRef"]["name"])
                if "secretKeyRef" in ref:
                    used["Secret"].add(ref["secretKeyRef"]["name"])
                    secret_keys.setdefault(ref["secretKeyRef"]["name"], set()).add(ref["secretKeyRef"]["key"])
    for kind in ("ConfigMap", "PersistentVolumeClaim", "ServiceAccount"):
        assert used[kind] <= have[kind], f"missing {kind}: {used[kind] - have[kind]}"
    # Secrets: the user creates them (README); rendering one would put a key in git.
    assert not have["Secret"], f"Secrets must not be rendered: {have['Secret']}"
    assert used["Secret"] <= USER_SECRETS.keys(), f"undocumented Secrets: {used['Secret'] - USER_SECRETS.keys()}"
    readme = (K8S / "README.md").read_text()
    for name, keys in secret_keys.items():
        assert f"kubectl -n {NAMESPACE} create secret generic {name}" in readme, f"README must show creating {name}"
        for key in keys:
            assert key in USER_SECRETS[name] and f"--from-literal={key}=" in readme, f"README: key {key} of {name}"


def test_api_key_secret_is_required(overlay):
    _, docs = overlay
    [c] = serve_deployment(docs)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional", False), "production must not start without an API key"
    assert all("value" not in env[k] for k in ("SERVE_API_KEY", "SERVE_ADMIN_KEY")), "no literal keys"


def test_resources_on_every_container(overlay):
    name, docs = overlay
    gpu_containers = 0
    for _, t in templates(docs):
        for c in containers(t):
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            for r in ("cpu", "memory"):
                assert r in req and r in lim, f"{c['name']}: {r} requests and limits"
                assert quantity(req[r]) <= quantity(lim[r]), f"{c['name']}: {r} request > limit"
            if GPU in req or GPU in lim:
                gpu_containers += 1
                assert req.get(GPU) == lim.get(GPU) and int(lim[GPU]) >= 1, f"{c['name']}: GPU requests == limits"
                spec = t["spec"]
                assert spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true"
                assert any(tol.get("key") == GPU and tol.get("effect") == "NoSchedule"
                           for tol in spec.get("tolerations", [])), f"{c['name']}: GPU toleration"
    # Every workload of the GPU overlays uses GPUs; the CPU overlay requests none.
    assert gpu_containers == (len(templates(docs)) if name in GPU_OVERLAYS else 0)


def test_images_are_pinned(overlay):
    name, docs = overlay
    images = {c["image"] for _, t in templates(docs) for c in containers(t)}
    for image in images:
        assert IMAGE_RE.match(image), f"{image}: expected ghcr.io/tunestack/tunestack-<target>:<x.y.z> (no latest)"
    serve = "serve-vllm" if name in GPU_OVERLAYS else "serve-flask"
    assert images == {f"ghcr.io/tunestack/tunestack-{serve}:0.1.0", "ghcr.io/tunestack/tunestack-train:0.1.0"}


def test_entrypoint_is_kept(overlay):
    """`command` would replace the image's ENTRYPOINT (tini): Python as PID 1 ignores SIGTERM. Only args are set."""
    _, docs = overlay
    for _, t in templates(docs):
        for c in containers(t):
            assert "command" not in c and c["args"], c["name"]


def test_security_context(overlay):
    _, docs = overlay
    for w, t in templates(docs):  # serve and train alike
        pod_sc = t["spec"].get("securityContext", {})
        assert t["spec"].get("automountServiceAccountToken") is False
        for c in containers(t):
            sc = {**pod_sc, **c.get("securityContext", {})}  # container settings override the pod's
            where = f"{w['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 10001, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            # A read-only root needs writable scratch: /tmp and $HOME on emptyDirs.
            volumes = {v["name"]: v for v in t["spec"]["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            home = next(e["value"] for e in c["env"] if e["name"] == "HOME")
            for path in ("/tmp", home):
                assert "emptyDir" in mounts.get(path, {}), f"{where}: {path} must be a writable emptyDir"
            if GPU in c["resources"]["limits"]:
                assert mounts["/dev/shm"]["emptyDir"].get("medium") == "Memory", f"{where}: /dev/shm"
            # kubelet creates subPath directories root-owned (kubernetes/kubernetes#41638): uid
            # 10001 could not write them, so volumes are mounted whole.
            assert not [m for m in c["volumeMounts"] if m.get("subPath") or m.get("subPathExpr")], where


def test_serve_backend_matches_overlay(overlay):
    name, docs = overlay
    dep = serve_deployment(docs)
    [c] = dep["spec"]["template"]["spec"]["containers"]
    [cm_name] = [s["configMapRef"]["name"] for s in c["envFrom"]]
    config = one(docs, "ConfigMap", cm_name)["data"]
    assert config["SERVE_BACKEND"] == ("vllm" if name in GPU_OVERLAYS else "flask")
    assert config["SERVE_ENGINE"] in ("torch", "onnx")
    assert not any(k in config for k in ("SERVE_API_KEY", "SERVE_ADMIN_KEY")), "keys belong in the Secret"
    assert c["args"][:2] == ["tunestack", "serve"] and "0.0.0.0" in c["args"]
    assert "replicas" not in dep["spec"], "KEDA owns the replica count; a value here resets it on every apply"


def test_registry_volume_is_shared(overlay):
    _, docs = overlay
    pvc = one(docs, "PersistentVolumeClaim", "tunestack-registry")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "train writes while every serve replica reads"

    def registry_mount(t):
        [vol] = [v for v in t["spec"]["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "tunestack-registry"]
        [c] = t["spec"]["containers"]
        [m] = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        return vol, m, c

    vol, m, c = registry_mount(serve_deployment(docs)["spec"]["template"])
    assert m.get("readOnly") is True and vol["persistentVolumeClaim"].get("readOnly") is True, "serve mounts it ro"
    assert c["args"][c["args"].index("--registry") + 1] == m["mountPath"]
    vol, m, c = registry_mount(train_job(docs)["spec"]["template"])
    assert not m.get("readOnly") and not vol["persistentVolumeClaim"].get("readOnly"), "train publishes: rw"
    assert f"output.registry={m['mountPath']}" in c["args"]
    assert {"name": "TUNESTACK_CACHE", "value": "/data/cache"} in c["env"]


def test_pdb_covers_serve_pods(overlay):
    _, docs = overlay
    [pdb] = objs(docs, "PodDisruptionBudget")
    sel = pdb["spec"]["selector"]["matchLabels"]
    assert selects(sel, serve_deployment(docs)["spec"]["template"]["metadata"]["labels"])
    assert not selects(sel, train_job(docs)["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"].get("minAvailable") == 1 or pdb["spec"].get("maxUnavailable") == 1


def test_scaledobject_targets_serve(overlay):
    _, docs = overlay
    [so] = objs(docs, "ScaledObject")
    ref = so["spec"]["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] == serve_deployment(docs)["metadata"]["name"]
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    [trig] = so["spec"]["triggers"]
    assert "tunestack_requests_queued" in trig["metadata"]["query"]
    assert f'namespace="{NAMESPACE}"' in trig["metadata"]["query"]


def test_servicemonitor_scrapes_serve(overlay):
    _, docs = overlay
    [sm] = objs(docs, "ServiceMonitor")
    [svc] = [s for s in objs(docs, "Service") if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert svc["metadata"]["name"] == "tunestack-serve" and svc["spec"]["type"] == "ClusterIP"
    assert {"name": "http", "port": 8000} in [{k: p[k] for k in ("name", "port")} for p in svc["spec"]["ports"]]
    [ep] = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics" and ep["interval"] == "15s"


def test_networkpolicy_allows_http_and_dns_only(overlay):
    _, docs = overlay
    labels = serve_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    [np] = [p for p in objs(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
    assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {(p.get("protocol", "TCP"), p["port"]) for r in np["spec"]["ingress"] for p in r["ports"]}
    assert ingress_ports == {("TCP", 8000)}
    peers = [peer for r in np["spec"]["ingress"] for peer in r["from"]]
    assert {"kubernetes.io/metadata.name": "monitoring"} in [p.get("namespaceSelector", {}).get("matchLabels") for p in peers]
    egress_ports = {p["port"] for r in np["spec"]["egress"] for p in r["ports"]}
    assert egress_ports == {53}, "serving needs DNS only"


def test_multinode_training_wiring(overlay):
    name, docs = overlay
    job = train_job(docs)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    if name != "gpu-multinode":
        assert spec.get("completionMode", "NonIndexed") == "NonIndexed" and c["args"][:2] == ["tunestack", "train"]
        return
    env = {e["name"]: e for e in c["env"]}
    nnodes, nproc = int(env["NNODES"]["value"]), int(env["NPROC_PER_NODE"]["value"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nnodes >= 2
    assert nproc == int(c["resources"]["limits"][GPU]), "one torchrun worker per GPU"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    svc = one(docs, "Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and selects(svc["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    cmd = c["args"]
    assert cmd[0] == "torchrun" and "--rdzv-backend=static" in cmd and cmd[cmd.index("-m") + 1] == "train"
    for flag in ("--nnodes=$(NNODES)", "--nproc-per-node=$(NPROC_PER_NODE)", "--node-rank=$(NODE_RANK)",
                 f"--master-addr={job['metadata']['name']}-0.{pod['subdomain']}", "--master-port=29500"):
        assert flag in cmd, flag
    assert 29500 in [p["port"] for p in svc["spec"]["ports"]]
    # No RWO volume may be shared by pods on several nodes.
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for claim in claims:
        assert one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"], claim


def test_yamllint():
    from yamllint import config, linter

    conf = config.YamlLintConfig("""
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  comments: {min-spaces-from-content: 1}
  indentation: {indent-sequences: consistent}
""")
    problems = [f"{p.relative_to(ROOT)}:{e.line}: {e.message}"
                for p in sorted(K8S.rglob("*.yaml")) for e in linter.run(p.read_text(), conf, str(p))]
    assert not problems, "\n".join(problems)
