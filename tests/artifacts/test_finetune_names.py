"""The names a fine-tuning job's model and checkpoints are called by, and the registry adapters they map to."""

from __future__ import annotations

import pytest

from artifacts.finetune import adapter_of, checkpoint_names, job_model_names, loss_at


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
