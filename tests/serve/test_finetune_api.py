"""Files and fine-tuning jobs through the official openai SDK: upload, validate, list, cancel, errors."""

from __future__ import annotations

import io
import json

import openai
import pytest

from tests.conftest import DEMO_TRAIN
from tests.serve.conftest import API_KEY, base_registry, start_server


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    reg = base_registry(tiny_model, tmp_path_factory.mktemp("ft"))
    s = start_server(reg, {"SERVE_API_KEY": API_KEY, "SERVE_THREADS": "2", "SERVE_MAX_UPLOAD_BYTES": "200000"})
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
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"method": {"type": "distillation"}}, "method"),
    ({"method": {"type": "reinforcement", "reinforcement": {}}}, "method"),
    ({"hyperparameters": {"n_epochs": 1, "warmup": 3}}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
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
    with pytest.raises(openai.NotFoundError):
        client.files.content("../../etc/passwd")
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {API_KEY}"},
                   content=json.dumps({"model": "x", "training_file": "f", "learning_rate": 1}))
    assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/files").status_code == 401
