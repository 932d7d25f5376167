"""The fused multi-LoRA path equals peft's mixed-adapter batch inference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve.engines.multi_lora import MultiLoRA
from tests.serve.conftest import peft_and_fused


@pytest.fixture(scope="module")
def models(tiny_model, adapter_runs):
    return peft_and_fused(tiny_model, adapter_runs)


def test_mixed_batch_logits_equal_peft(models):
    ref, base, ml = models
    rows = ["a", None, "b", "a", "b", None]
    ids = torch.randint(3, 500, (len(rows), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        ml.set_rows(rows)
        got = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want[0] - want[1]).abs().max() > 1e-3, "adapters must actually change the output"


def test_unload_restores_the_base(models, tiny_model):
    _, base, ml = models
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (2, 5), generator=torch.Generator().manual_seed(1))
    ml.unload("b")
    ml.set_rows(["a", None])
    with torch.no_grad():
        out = base(input_ids=ids).logits
        torch.testing.assert_close(out[1], plain(input_ids=ids).logits[1])
    ml.unload("a")
    ml.set_rows([None, None])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_refuses_non_lora(adapter_runs, tiny_model, tmp_path):
    import json
    import shutil

    bad = tmp_path / "dora"
    shutil.copytree(adapter_runs["chef-a"] / "adapter", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    ml = MultiLoRA(AutoModelForCausalLM.from_pretrained(tiny_model))
    with pytest.raises(ValueError, match="only plain LoRA"):
        ml.load("dora", bad)
