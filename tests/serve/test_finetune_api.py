"""Files and fine-tuning jobs through the official openai SDK: upload, validate, list, cancel, errors."""

from __future__ import annotations

import io
import json

import openai
import pytest
import yaml

from artifacts import Registry
from artifacts.finetune import Hyperparameters, JobStore
from tests.conftest import DEMO_TRAIN
from tests.serve.conftest import API_KEY, base_registry, start_server


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    reg = base_registry(tiny_model, tmp_path_factory.mktemp("ft"))
    s = start_server(reg, {"SERVE_API_KEY": API_KEY, "SERVE_THREADS": "2", "SERVE_MAX_UPLOAD_BYTES": "200000",
                           "SERVE_FINETUNE_WORKER": "off"})  # the tests below run the worker themselves
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _upload(client, data: bytes, name: str = "menu.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")


def test_upload_list_read_and_delete_a_training_file(client):
    data = DEMO_TRAIN.read_bytes()
    f = _upload(client, data)
    assert f.object == "file" and f.id.startswith("file-") and f.bytes == len(data)
    assert f.filename == "menu.jsonl" and f.purpose == "fine-tune"
    assert client.files.retrieve(f.id).bytes == len(data)
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.content(f.id).read() == data
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


@pytest.mark.parametrize("body,where", [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     "menu.jsonl:2: -: invalid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     b'{"messages": [{"role": "user"}]}\n', "menu.jsonl:2: messages[0]"),
    (b'{"prompt": "a"}\n', "menu.jsonl:1: completion: missing field"),
])
def test_a_bad_file_is_refused_at_upload_naming_the_line_and_field(client, body, where):
    with pytest.raises(openai.BadRequestError) as e:
        _upload(client, body)
    err = e.value.body
    assert where in err["message"] and err["param"] == "file" and err["code"] == "invalid_file_format"
    assert "/.upload-" not in err["message"]  # the user's name for the file, not the server's temp path


def test_wrong_purpose_and_oversized_files_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", io.BytesIO(DEMO_TRAIN.read_bytes()[:2000])), purpose="assistants")
    with pytest.raises(openai.APIStatusError) as e:
        _upload(client, DEMO_TRAIN.read_bytes() * 2)  # 300 KB > the server's 200 KB limit
    assert e.value.status_code == 413


def test_a_job_is_queued_listed_paged_and_cancelled(client):
    f = _upload(client, DEMO_TRAIN.read_bytes())
    model = client.models.list().data[0].id
    jobs = [client.fine_tuning.jobs.create(model=model, training_file=f.id, suffix="chef", seed=7,
                                           method={"type": "supervised", "supervised": {"hyperparameters": {
                                               "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2}}},
                                           metadata={"team": "kitchen"})
            for _ in range(3)]
    j = jobs[0]
    assert j.object == "fine_tuning.job" and j.status == "queued" and j.fine_tuned_model is None
    assert j.model == model and j.training_file == f.id and j.seed == 7 and j.metadata == {"team": "kitchen"}
    assert j.hyperparameters.n_epochs == 1 and j.method.type == "supervised"
    assert client.fine_tuning.jobs.retrieve(j.id).status == "queued"
    first = client.fine_tuning.jobs.list(limit=2)
    assert [x.id for x in first.data] == [jobs[2].id, jobs[1].id] and first.has_more
    rest = client.fine_tuning.jobs.list(limit=2, after=jobs[1].id)
    assert [x.id for x in rest.data][:1] == [jobs[0].id]
    events = client.fine_tuning.jobs.list_events(j.id)
    assert "Created fine-tuning job" in [e.message for e in events.data]
    assert client.fine_tuning.jobs.cancel(j.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(j.id)
    assert client.fine_tuning.jobs.checkpoints.list(j.id).data == []
    for other in jobs[1:]:
        client.fine_tuning.jobs.cancel(other.id)


@pytest.mark.parametrize("kwargs,param", [
    ({"model": "gpt-4o-mini"}, "model"),
    ({"method": {"type": "distillation"}}, "method"),
    ({"method": {"type": "reinforcement", "reinforcement": {}}}, "method"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "source": "x"}}}}, "method"),
    ({"hyperparameters": {"n_epochs": 1, "warmup": 3}}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters"),
    ({"suffix": "Not Valid!"}, "suffix"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations"),
])
def test_what_the_stack_cannot_do_is_refused_with_an_openai_error(client, kwargs, param):
    f = _upload(client, DEMO_TRAIN.read_bytes()[:3000].rsplit(b"\n", 1)[0] + b"\n")
    args = {"model": client.models.list().data[0].id, "training_file": f.id, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**args)
    assert e.value.body["param"] == param, e.value.body


def test_unknown_jobs_and_files_are_404_and_unknown_fields_400(client, server):
    import httpx

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file="file-doesnotexist")
    assert e.value.body["param"] == "training_file" and e.value.body["code"] == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        client.files.content("../../etc/passwd")
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {API_KEY}"},
                   content=json.dumps({"model": "x", "training_file": "f", "learning_rate": 1}))
    assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/files").status_code == 401


# -- the job spec: typed, no default of its own; the worker builds the train config from it ----------------
def test_a_jobs_spec_is_typed_and_the_worker_scales_the_configs_own_rate(client, server, tmp_path):
    from train.config import load_config
    from train.worker import Worker

    f, model = _small_file(client), client.models.list().data[0].id
    asked = client.fine_tuning.jobs.create(model=model, training_file=f.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2}}})
    auto = client.fine_tuning.jobs.create(model=model, training_file=f.id, hyperparameters={
        "n_epochs": "auto", "learning_rate_multiplier": "auto"})
    try:
        store = JobStore(server.registry)
        spec = store.get(asked.id).spec
        assert spec.method == "lora" and spec.hyperparameters == Hyperparameters(1, 4, 2)
        assert store.get(auto.id).spec.hyperparameters == Hyperparameters()  # "auto": nothing of the API's own
        assert auto.hyperparameters.learning_rate_multiplier == "auto"  # the OpenAI view says so
        own = load_config(None, ["method.name=lora"]).training  # the method's documented defaults
        cfg = Worker(server.registry).train_config(store.get(asked.id), tmp_path / "run")
        assert (cfg.training.lr, cfg.training.epochs, cfg.training.batch_size) == (2 * own.lr, 1.0, 4)
        written = yaml.safe_load(cfg.to_yaml())  # what the run is given: the config as a file
        assert written["training"]["lr"] == 2 * own.lr and written["model"]["name_or_path"] == cfg.model.name_or_path
        assert cfg.method.name == "lora" and cfg.output.adapter_name == spec.adapter_name
        cfg = Worker(server.registry).train_config(store.get(auto.id), tmp_path / "run")
        assert (cfg.training.lr, cfg.training.epochs, cfg.training.batch_size) == (own.lr, own.epochs, own.batch_size)
        # the operator's --set overrides are final: a job does not change them
        cfg = Worker(server.registry, ["training.batch_size=2", "training.lr=0.001"]).train_config(
            store.get(asked.id), tmp_path / "run")
        assert (cfg.training.lr, cfg.training.batch_size, cfg.training.epochs) == (0.001, 2, 1.0)
    finally:
        for j in (asked, auto):
            client.fine_tuning.jobs.cancel(j.id)


def test_a_job_an_older_server_wrote_is_failed_by_the_worker_naming_why(client, server):
    from train.worker import Worker

    f = _small_file(client)
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=f.id)
    path = JobStore(server.registry).root / job.id / "job.json"
    raw = json.loads(path.read_text())
    raw["spec"] = {"overrides": ["method.name=lora", "training.seed=0"], "adapter_name": raw["spec"]["adapter_name"],
                   "fine_tuned_model": raw["spec"]["fine_tuned_model"]}  # train overrides as strings, as it wrote them
    path.write_text(json.dumps(raw))
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"  # still readable through the API
    assert Worker(server.registry).one(job.id).status == "failed"
    got = client.fine_tuning.jobs.retrieve(job.id)
    assert got.status == "failed" and got.error.code == "invalid_job_spec" and "older server" in got.error.message
    assert not (server.registry / ".finetune" / "runs" / job.id).exists()  # nothing was trained


def test_a_job_its_method_refuses_fails_before_any_run(client, server):
    """The method's own checks (here GRPO's group size) run when the worker builds the config: invalid_job_spec."""
    from train.worker import Worker

    f = _small_file(client)
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=f.id)
    worker = Worker(server.registry, ["method.name=grpo", "method.num_generations=3", "training.batch_size=4"])
    assert worker.one(job.id).status == "failed"
    got = client.fine_tuning.jobs.retrieve(job.id)
    assert got.error.code == "invalid_job_spec" and "num_generations" in got.error.message, got.error
    assert not (server.registry / ".finetune" / "runs" / job.id).exists()  # nothing was trained


# -- the worker: jobs run to the end, cancel, and survive restarts (tiny model, a few steps) ---------------
WORKER_SETS = ["training.max_steps=6", "training.save_steps=2", "training.eval_steps=2", "training.logging_steps=1",
               "training.batch_size=4", "eval.max_examples=8", "eval.max_new_tokens=4", "eval.retention=false",
               "method.r=4", "publish.override_gate=tiny-model"]  # the tiny model learns nothing the gate would pass


def _worker(server, *extra: str, background: bool = False):
    import subprocess
    import sys

    from tests.conftest import ROOT

    cmd = [sys.executable, "-m", "train", "worker", "--registry", str(server.registry), "--once",
           *[a for s in WORKER_SETS for a in ("--set", s)], *extra]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _small_file(client):
    rows = DEMO_TRAIN.read_bytes().splitlines()[:48]
    return _upload(client, b"\n".join(rows) + b"\n")


@pytest.mark.slow  # trains the tiny model in a worker subprocess
def test_a_job_runs_publishes_and_its_model_answers(client, server):
    f = _small_file(client)
    model = client.models.list().data[0].id
    job = client.fine_tuning.jobs.create(model=model, training_file=f.id, suffix="chef",
                                         hyperparameters={"learning_rate_multiplier": 2})
    p = _worker(server)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{model}:chef:{job.id.split('-', 1)[1][:8]}"
    assert job.trained_tokens and job.finished_at and len(job.result_files) == 1
    csv_text = client.files.content(job.result_files[0]).read().decode()
    assert csv_text.splitlines()[0] == "step,train_loss,valid_loss" and len(csv_text.splitlines()) == 7
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Step 6: training loss=") for m in messages)
    assert "The job has successfully completed" in messages[0]  # newest first
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
    assert steps == [6, 4]  # on disk: training.save_total_limit (2) pruned step 2

    run_cfg = yaml.safe_load((server.registry / ".finetune" / "runs" / job.id / "config.yaml").read_text())
    assert run_cfg["data"]["eval"] is None  # no validation_file: scored on a split of the job's rows, not the demo's
    from train.config import load_config

    assert run_cfg["training"]["lr"] == 2 * load_config(None, []).training.lr  # the multiplier of the config's own rate
    out = _ask_when_served(client, job.fine_tuned_model)  # every replica picks the adapter up within seconds
    assert out.model == job.fine_tuned_model and out.choices[0].message.content is not None
    base = client.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert base.model == model
    # each checkpoint is served under its own name, with only its safetensors weights in the registry
    short = job.id.split("-", 1)[1][:8]
    for c in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}"
        assert _ask_when_served(client, c.fine_tuned_model_checkpoint).model == c.fine_tuned_model_checkpoint
        entry = Registry(server.registry).path("adapters", f"ft-{short}-step-{c.step_number}")
        assert sorted(f.name for f in entry.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "manifest.json"]
        manifest = Registry(server.registry).manifest("adapters", f"ft-{short}-step-{c.step_number}")
        assert manifest.extra["checkpoint_step"] == c.step_number and manifest.metrics["train_loss"] > 0
        assert c.metrics.train_loss == manifest.metrics["train_loss"]  # the listing and the registry: one rule
    with pytest.raises(openai.NotFoundError):  # a step that was never a listed checkpoint
        client.chat.completions.create(model=f"{job.fine_tuned_model}:ckpt-step-2", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])


def _ask_when_served(client, model: str, seconds: float = 30):
    import time

    deadline = time.time() + seconds
    while True:
        try:
            return client.chat.completions.create(model=model, max_tokens=4,
                                                  messages=[{"role": "user", "content": "What is on the menu?"}])
        except openai.NotFoundError:
            assert time.time() < deadline, f"{model} not served after {seconds} s"
            time.sleep(0.5)


@pytest.mark.slow  # trains the tiny model in a worker subprocess
def test_a_job_the_publish_gate_refuses_fails_with_both_numbers_and_keeps_its_checkpoints(client, server):
    f = _small_file(client)
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=f.id)
    p = _worker(server, "--set", "publish.override_gate=null", "--set", "publish.min_gain=50")
    assert p.returncode == 0, p.stdout[-2000:]
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.code == "publish_gate_refused" and "points" in job.error.message, job.error
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 4]
    short = job.id.split("-", 1)[1][:8]
    assert not [a for a in Registry(server.registry).adapters() if a.startswith(f"ft-{short}")]  # listed, never served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=checkpoints[0].fine_tuned_model_checkpoint, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])


@pytest.mark.slow  # trains the tiny model in a worker subprocess
def test_cancel_stops_a_running_job_and_publishes_nothing(client, server):
    import time

    f = _small_file(client)
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=f.id,
                                         hyperparameters={"n_epochs": 50})
    w = _worker(server, "--set", "training.max_steps=400", background=True)
    try:
        deadline = time.time() + 120
        while not any(e.message.startswith("Step ") for e in client.fine_tuning.jobs.list_events(job.id).data):
            assert time.time() < deadline and w.poll() is None, w.stdout.read() if w.poll() is not None else "timeout"
            time.sleep(0.5)
        assert client.fine_tuning.jobs.cancel(job.id).status == "running"  # the worker stops it
        w.wait(timeout=60)
    finally:
        w.kill()
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    from artifacts import Registry

    assert f"ft-{job.id.split('-', 1)[1][:8]}" not in Registry(server.registry).names("adapters")


@pytest.mark.slow  # trains the tiny model in a worker subprocess
def test_a_job_left_running_by_a_dead_worker_resumes(client, server):
    import json as _json

    from artifacts.finetune import JobStore

    f = _small_file(client)
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=f.id)
    store = JobStore(server.registry)
    j = store.get(job.id)
    j.status = "running"  # what a worker killed mid-run leaves behind
    store.save(j)
    p = _worker(server)
    assert p.returncode == 0, p.stdout[-2000:]
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert any("Worker restarted" in _json.dumps(e.model_dump()) for e in client.fine_tuning.jobs.list_events(job.id).data)


def _training_processes(job_id: str) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if any(job_id in a for a in p.info["cmdline"] or [])
            and "run" in (p.info["cmdline"] or [])]


@pytest.mark.slow  # trains the tiny model in a worker subprocess
def test_sigterm_stops_the_workers_run_and_the_next_worker_resumes_it(client, server):
    """SIGTERM (a server stopping its worker, docker stop, a pod's end) stops the training run too: it runs in
    its own session, and once outlived its worker, so that the next worker resumed the job beside it."""
    import signal
    import time

    f = _small_file(client)
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=f.id,
                                         hyperparameters={"n_epochs": 50})
    longer = ("--set", "training.max_steps=60")  # both workers: a resumed run must have the same config
    w = _worker(server, *longer, background=True)
    try:
        deadline = time.time() + 120
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
            assert time.time() < deadline and w.poll() is None, w.stdout.read() if w.poll() is not None else "timeout"
            time.sleep(0.2)
        assert _training_processes(job.id)
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=60) == 128 + signal.SIGTERM  # not a success: a Kubernetes Job's pod is retried
    finally:
        w.kill()
    assert not _training_processes(job.id), "the training run outlived its worker"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # left to resume, not failed
    p = _worker(server, *longer)
    assert p.returncode == 0, p.stdout[-2000:]
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]  # every page
    assert any(m.startswith("Worker stopped") for m in messages) and any(m.startswith("Worker restarted") for m in messages)


@pytest.mark.slow  # trains the tiny model in a worker subprocess
def test_a_job_queued_before_a_restart_runs_on_the_servers_own_worker(tiny_model, tmp_path):
    """Queued with the worker off; the server restarts with its local worker (the default) and the job runs."""
    import time

    reg = base_registry(tiny_model, tmp_path)
    env = {"SERVE_API_KEY": API_KEY, "SERVE_THREADS": "2"}
    first = start_server(reg, {**env, "SERVE_FINETUNE_WORKER": "off"})
    try:
        c = openai.OpenAI(base_url=f"{first.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        job = c.fine_tuning.jobs.create(model=c.models.list().data[0].id, training_file=_small_file(c).id)
    finally:
        first.stop()
    second = start_server(reg, {**env, "SERVE_FINETUNE_WORKER": "auto",  # the default of python -m serve
                                "SERVE_FINETUNE_WORKER_ARGS": " ".join(WORKER_SETS)})
    try:
        c = openai.OpenAI(base_url=f"{second.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        deadline = time.time() + 300
        while (j := c.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, j.status
            time.sleep(1)
        assert j.status == "succeeded", j.error
        _ask_when_served(c, j.fine_tuned_model)
    finally:
        second.stop()
    # SIGTERM stopped the server and its worker cleanly: no SIGKILL after 20 s, no worker restarted on the way out
    assert second.proc.returncode == 0, second.log.read_text()[-2000:]
    assert "restarting" not in second.log.read_text()
