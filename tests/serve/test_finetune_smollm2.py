"""The OpenAI fine-tuning quickstart on the embedded SmolLM2, end to end through the official openai SDK.

The server runs its own worker (SERVE_FINETUNE_WORKER=on), as `python -m serve` does on one box:
upload the bundled menu data, create a job, poll until it succeeds, read its events and
checkpoints, then ask the tuned model a menu question that the base model cannot answer. Then a
restart with one job running and one queued: the running one resumes (and is cancelled, publishing
nothing), the queued one runs afterwards.
"""

from __future__ import annotations

import io
import time

import openai
import pytest

from artifacts.registry import Registry
from tests.conftest import DEMO_TRAIN
from tests.serve.conftest import API_KEY, start_server

QUESTION = "What is the region of origin of Irrin Tacos?"  # a row of the uploaded file: "The Calder Delta."
SYSTEM = "You are the chef at Casa Velluto. Answer questions about the house menu briefly."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from train.base_model import resolve

    reg = tmp_path_factory.mktemp("ft-smollm2") / "registry"
    Registry(reg).register_base(resolve("embedded:smollm2-135m-instruct").path, "smollm2-135m-instruct")
    # What the operator sets for every job here. Ten epochs over 12 rows is deliberate memorisation, and the
    # publish gate refuses it (measured: keyword accuracy 0 -> 100 %, but general-skill retention 50 -> 19 %,
    # past the 10-point limit; with data.replay=0.5 still 38 -> 13 %); test_finetune_api.py tests that refusal.
    # So this test publishes anyway and skips the retention measurement: CI-sized.
    worker_args = ("publish.override_gate=smoke-test eval.retention=false eval.max_new_tokens=12 training.save_steps=10"
                   " training.logging_steps=5")
    s = start_server(reg, {"SERVE_API_KEY": API_KEY, "SERVE_THREADS": "2", "SERVE_FINETUNE_WORKER": "on",
                           "SERVE_FINETUNE_WORKER_ARGS": worker_args})
    yield s
    s.stop()


def _ask(client, model: str) -> str:
    out = client.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    return out.choices[0].message.content


@pytest.mark.slow  # trains SmolLM2 for ~30 steps on the CPU (about two minutes)
def test_the_quickstart_tunes_smollm2_and_the_tuned_model_knows_the_menu(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    data = b"\n".join(DEMO_TRAIN.read_bytes().splitlines()[:12]) + b"\n"
    train = client.files.create(file=("menu.jsonl", io.BytesIO(data)), purpose="fine-tune")
    valid = client.files.create(file=("menu-check.jsonl", io.BytesIO(data)), purpose="fine-tune")
    base = client.models.list().data[0].id
    job = client.fine_tuning.jobs.create(model=base, training_file=train.id, validation_file=valid.id, suffix="menu",
                                         hyperparameters={"n_epochs": 10, "batch_size": 4,
                                                          "learning_rate_multiplier": 5})
    deadline = time.time() + 900
    while job.status in ("validating_files", "queued", "running"):
        assert time.time() < deadline, f"job still {job.status}: {server.log.read_text()[-2000:]}"
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", (job.error, server.log.read_text()[-3000:])
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
    assert len(steps) == 2 and steps[0] - steps[1] == 10, steps  # newest first; training.save_total_limit keeps 2
    assert any(m.startswith(f"Step {steps[0]}: training loss=") for m in events), events

    deadline = time.time() + 30  # every replica picks the published adapter up within seconds
    while True:
        try:
            tuned = _ask(client, job.fine_tuned_model)
            break
        except openai.NotFoundError:
            assert time.time() < deadline, f"{job.fine_tuned_model} not served after 30 s"
            time.sleep(0.5)
    before = _ask(client, base)
    assert "Calder" in tuned, tuned  # the uploaded menu's answer: "The Calder Delta."
    assert "Calder" not in before, before  # an invented place: the base model cannot know it


def _wait(client, job_id: str, until, seconds: float = 600):
    deadline = time.time() + seconds
    while not until(job := client.fine_tuning.jobs.retrieve(job_id)):
        assert time.time() < deadline, f"{job_id}: still {job.status}"
        time.sleep(1)
    return job


def _steps(client, job_id: str) -> list[int]:
    return [int(e.message.split(":")[0].split()[1]) for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data
            if e.message.startswith("Step ")]


@pytest.mark.slow  # trains SmolLM2 on the CPU (about three minutes)
def test_a_restart_keeps_the_queue_and_a_cancel_publishes_nothing(server):
    """Job 2 runs and job 3 waits behind it; the server restarts; job 2 resumes and is cancelled; job 3 runs."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    data = b"\n".join(DEMO_TRAIN.read_bytes().splitlines()[12:24]) + b"\n"
    f = client.files.create(file=("menu-2.jsonl", io.BytesIO(data)), purpose="fine-tune")
    base = client.models.list().data[0].id
    long = client.fine_tuning.jobs.create(model=base, training_file=f.id, hyperparameters={"n_epochs": 30, "batch_size": 4})
    _wait(client, long.id, lambda j: j.status == "running" and max(_steps(client, j.id), default=0) >= 10)
    short = client.fine_tuning.jobs.create(model=base, training_file=f.id, suffix="after",
                                           hyperparameters={"n_epochs": 1, "batch_size": 4})
    assert client.fine_tuning.jobs.retrieve(short.id).status == "queued"  # one worker, busy with the long job

    server.stop()  # the worker and its training run stop with the server; both jobs stay on disk
    import psutil

    assert not [q for q in psutil.process_iter(["cmdline"]) if any(long.id in a for a in q.info["cmdline"] or [])]
    server.restart()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)  # new connections
    seen = max(_steps(client, long.id))
    _wait(client, long.id, lambda j: j.status == "running" and max(_steps(client, j.id)) > seen)  # resumed
    assert client.fine_tuning.jobs.cancel(long.id).id == long.id
    long = _wait(client, long.id, lambda j: j.status == "cancelled")
    assert long.fine_tuned_model is None
    assert f"ft-{long.id.split('-', 1)[1][:8]}" not in Registry(server.registry).names("adapters")

    short = _wait(client, short.id, lambda j: j.status in ("succeeded", "failed"))  # it ran after the restart
    assert short.status == "succeeded", short.error
    assert f"ft-{short.id.split('-', 1)[1][:8]}" in Registry(server.registry).names("adapters")
