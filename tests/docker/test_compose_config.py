"""Static checks of the compose files and monitoring config (no Docker engine needed)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

MON = ROOT / "configs" / "monitoring"


def _config(*files: str) -> dict:
    assert shutil.which("docker-compose"), "docker-compose is missing: `make docker` installs it"
    args = [a for f in files for a in ("-f", f)]
    p = subprocess.run(["docker-compose", *args, "config"], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin:/usr/local/bin"})  # no API_KEY etc.: defaults must work
    assert p.returncode == 0, p.stderr
    return yaml.safe_load(p.stdout)


def test_cpu_pipeline_is_ordered_and_needs_no_settings():
    c = _config("compose.yaml")["services"]
    assert c["export"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert c["serve"]["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert c["serve"]["environment"]["SERVE_BACKEND"] == "flask"
    ports = [p if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}"
             for s in c.values() for p in s.get("ports", [])]
    assert len(ports) == 3 and all(p.startswith("127.0.0.1:") for p in ports), ports
    for svc in ("train", "export", "serve"):
        assert c[svc]["build"]["target"] == "serve-flask"
    for s in c.values():
        tag = s["image"].rsplit(":", 1)
        assert len(tag) == 2 and tag[1] not in ("latest", ""), s["image"]


def test_gpu_override_reserves_devices_and_uses_vllm():
    c = _config("compose.yaml", "compose.gpu.yaml")["services"]
    assert c["serve"]["environment"]["SERVE_BACKEND"] == "vllm"
    assert c["serve"]["build"]["target"] == "serve-vllm"
    assert {c[s]["build"]["target"] for s in ("train", "export")} == {"train", "export"}
    for svc in ("train", "export", "serve"):
        dev = c[svc]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_dockerfile_bases_are_pinned_build_args():
    text = (ROOT / "Dockerfile").read_text()
    args = {line.split("=", 1)[0].split()[1]: line.split("=", 1)[1] for line in text.splitlines()
            if line.startswith("ARG ") and "IMAGE=" in line}
    assert set(args) == {"PYTHON_IMAGE", "CUDA_IMAGE", "VLLM_IMAGE"}
    for image in args.values():
        assert ":" in image and not image.endswith(":latest"), image
    targets = {line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")}
    assert {"serve-flask", "train", "export", "serve-vllm"} <= targets
    assert text.count("USER 10001:10001") == 4 and 'ENTRYPOINT ["tini", "--"]' in text
    assert "local/python-base" not in text and "/wheels" not in text  # test wiring stays in tests/docker


def test_prometheus_config_passes_promtool():
    p = subprocess.run(["promtool", "check", "config", str(MON / "prometheus.yml")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_grafana_provisioning_matches_the_dashboard():
    ds = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    prov = yaml.safe_load((MON / "grafana/provisioning/dashboards/tunestack.yaml").read_text())["providers"][0]
    assert prov["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads((MON / "grafana/dashboards/tunestack.json").read_text())
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("requests", "tokens/s", "time to first token", "time per output token", "queue", "adapters"):
        assert topic in titles, topic
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == ds["uid"]
        assert all(t["datasource"]["uid"] == ds["uid"] and "tunestack_" in t["expr"] for t in p["targets"])
    by_adapter = [t["expr"] for p in dash["panels"] for t in p["targets"] if "quantile" in t["expr"]]
    assert by_adapter and all("adapter" in e for e in by_adapter)


@pytest.mark.parametrize("name", [".env.example"])
def test_env_example_has_no_secrets_and_no_inline_comments(name):
    for line in (ROOT / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert "#" not in value, line  # compose v1 keeps inline comments in the value
            if "KEY" in key or "PASSWORD" in key:
                assert value == "", line
