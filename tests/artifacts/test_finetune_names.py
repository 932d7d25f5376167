"""The names a fine-tuning job's model and checkpoints are called by, and the registry adapters they map to."""

from __future__ import annotations

import pytest

from artifacts.finetune import adapter_of, checkpoint_names, job_model_names


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
