"""load_run_weights: a run's tuned model, merged for scoring only where the merge is exact and possible."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

from artifacts import RunDir
from lm.loading import load_model, load_run_weights


def _save_adapter(tiny_model, tmp_path, cfg) -> RunDir:
    torch.manual_seed(0)
    model = get_peft_model(load_model(str(tiny_model), torch.float32), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: B is zero at init, which would make the merge trivially equal
            torch.nn.init.normal_(p, std=0.5)
    rd = RunDir(tmp_path / "run")
    model.save_pretrained(str(rd.adapter))
    return rd


def test_a_merged_lora_scores_the_same_logits_as_base_plus_adapter(tiny_model, tmp_path):
    rd = _save_adapter(tiny_model, tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    unmerged = load_run_weights(rd, str(tiny_model)).eval()
    merged = load_run_weights(rd, str(tiny_model), merge=True).eval()
    assert isinstance(unmerged, PeftModel) and not isinstance(merged, PeftModel)
    ids = torch.randint(3, 50, (2, 12))
    with torch.no_grad():
        a, b = unmerged(ids).logits, merged(ids).logits
        plain = load_model(str(tiny_model), torch.float32).eval()(ids).logits
    assert (a - plain).abs().max() > 1e-2  # the adapter changes the logits: the comparison below means something
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_and_prompt_tuning_are_not_merged(tiny_model, tmp_path):
    rd = _save_adapter(tiny_model, tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert isinstance(load_run_weights(rd, str(tiny_model), torch.bfloat16, merge=True), PeftModel)
    pt = _save_adapter(tiny_model, tmp_path / "pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert isinstance(load_run_weights(pt, str(tiny_model), merge=True), PeftModel)
