"""The names a fine-tuning job's model and checkpoints are called by, the registry adapters they map to, and the
typed job spec the API writes and the worker reads."""

from __future__ import annotations

import json

import pytest

from artifacts.finetune import (Hyperparameters, Job, JobSpec, JobStore, adapter_of, checkpoint_names, job_model_names,
                                loss_at)


def test_a_job_and_its_checkpoints_round_trip_to_their_adapters():
    adapter, model = job_model_names("SmolLM2", "chef", "1a2b3c4d")
    assert (adapter, model) == ("ft-1a2b3c4d", "ft:SmolLM2:chef:1a2b3c4d")
    assert adapter_of(model, "SmolLM2") == adapter
    ck_adapter, ck_model = checkpoint_names(adapter, model, 40)
    assert ck_model == "ft:SmolLM2:chef:1a2b3c4d:ckpt-step-40" and adapter_of(ck_model, "SmolLM2") == ck_adapter
    assert adapter_of(job_model_names("SmolLM2", None, "1a2b3c4d")[1], "SmolLM2") == "ft-1a2b3c4d"  # no suffix


@pytest.mark.parametrize("name", [
    "ft:OtherBase:chef:1a2b3c4d",  # another base model
    "ft:SmolLM2:chef:",  # no job id
    "ft:SmolLM2:chef:1a2b3c4d:step-4",  # not OpenAI's checkpoint form
    "ft:SmolLM2:chef:1a2b3c4d:ckpt-step-x",
    "ft:SmolLM2:chef:1a2b3c4d:ckpt-step-4:more",
    "ftjob-1a2b3c4d", "SmolLM2",
])
def test_other_names_map_to_no_adapter(name):
    assert adapter_of(name, "SmolLM2") is None


def test_a_checkpoints_loss_is_the_last_logged_at_or_before_its_step():
    history = [{"step": 1, "loss": 3.0}, {"step": 4, "loss": 2.0}, {"step": 5, "eval_loss": 1.5}, {"step": 8, "loss": 1.0}]
    assert [loss_at(history, s) for s in (0, 1, 5, 7, 8, 99)] == [None, 3.0, 2.0, 2.0, 1.0, 1.0]
    assert loss_at(list(reversed(history)), 5) == 2.0  # the order it was read in does not matter


def test_a_job_spec_round_trips_typed_with_no_default_of_its_own(tmp_path):
    store = JobStore(tmp_path)
    spec = JobSpec("dpo", Hyperparameters(n_epochs=2, learning_rate_multiplier=0.5, beta=0.2), [], "ft-1", "ft:b::1")
    store.create(Job("ftjob-1", "b", "file-1", 0, status="queued", spec=spec))
    got = store.get("ftjob-1").spec
    assert got == spec and isinstance(got.hyperparameters, Hyperparameters) and got.outdated is None
    raw = json.loads((store.root / "ftjob-1" / "job.json").read_text())["spec"]
    assert raw["hyperparameters"] == {"n_epochs": 2, "batch_size": None, "learning_rate_multiplier": 0.5, "beta": 0.2}
    assert "lr" not in json.dumps(raw).replace("learning_rate_multiplier", "")  # no learning rate: the config owns it
    assert spec.hyperparameters.public() == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}


@pytest.mark.parametrize("bad", [{"learning_rate_multiplier": 0}, {"batch_size": True}, {"n_epochs": "3"}])
def test_hyperparameters_refuse_what_no_trainer_takes(bad):
    with pytest.raises(ValueError, match=f"hyperparameters.{next(iter(bad))}"):
        Hyperparameters(**bad)


def test_a_job_an_older_server_wrote_stays_readable_and_says_why_it_cannot_run(tmp_path):
    store = JobStore(tmp_path)
    store.create(Job("ftjob-2", "b", "file-1", 0, status="queued"))
    path = store.root / "ftjob-2" / "job.json"
    old = json.loads(path.read_text())
    old["spec"] = {"overrides": ["method.name=lora", "training.seed=0", "training.lr=0.0004"], "adapter_name": "ft-2",
                   "fine_tuned_model": "ft:b::2"}  # the strings the older API wrote, the rate already multiplied out
    path.write_text(json.dumps(old))
    job = store.get("ftjob-2")
    assert job.status == "queued" and job.spec.adapter_name == "ft-2" and job.spec.fine_tuned_model == "ft:b::2"
    assert "older server" in job.spec.outdated and "create the job again" in job.spec.outdated
    assert [j.id for j in store.list()] == ["ftjob-2"]  # listed, so the API shows it and the worker can fail it
