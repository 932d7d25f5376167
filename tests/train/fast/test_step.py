"""The fused step computes the transformers + peft forward's loss and gradients (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from lm.padding import Collator
from tests.train.fast.models import rows, tiny
from train.fast.collate import PaddingFreeCollator
from train.fast.decoder import FusedStep
from train.fast.plan import model_parts

CASES = {
    "llama-full": ("llama", None, {}),
    "qwen2-full (q/k/v bias)": ("qwen2", None, {}),
    "llama-lora-all": ("llama", {"target_modules": "all-linear"}, {}),
    "qwen2-lora-partial (no k_proj, no up_proj)": ("qwen2", {"target_modules": ["q_proj", "v_proj", "o_proj",
                                                                               "gate_proj", "down_proj"]}, {}),
    "llama-attention-bias-rslora": ("llama", {"target_modules": "all-linear", "use_rslora": True},
                                    {"attention_bias": True}),
    "mistral-lora": ("mistral", {"target_modules": ["q_proj", "v_proj"]}, {"sliding_window": None}),
}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_transformers(case):
    arch, lora, config = CASES[case]
    model = tiny(arch, lora, **config)
    ref = copy.deepcopy(model)
    batch = rows()
    expected = ref(**Collator(0)(batch)).loss
    expected.backward()
    step = FusedStep(model, model_parts(model, 256), torch.float32, compile=False)
    got = step(**PaddingFreeCollator()(batch)).loss
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys() and g
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_groups_are_fused_without_a_copy():
    model = tiny("qwen2", {"target_modules": "all-linear"})
    step = FusedStep(model, model_parts(model, 256), torch.float32, compile=False)
    step(**PaddingFreeCollator()(rows()))
    attn = model.get_base_model().model.layers[0].self_attn
    fused = step._groups[0][0][0][0]  # layer 0, the q/k/v group, its one (fused) base weight
    assert attn.q_proj.base_layer.weight.data_ptr() == fused.data_ptr()
    assert attn.k_proj.base_layer.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_num_items_in_batch_scales_like_transformers():
    """With gradient accumulation the Trainer passes the token count of all micro-batches."""
    model = tiny("llama", {"target_modules": "all-linear"})
    step = FusedStep(model, model_parts(model, 256), torch.float32, compile=False)
    b = PaddingFreeCollator()(rows())
    n = b["target_positions"].numel()
    mean = step(**b).loss
    assert step(**b, num_items_in_batch=2 * n).loss.item() == pytest.approx(mean.item() / 2, rel=1e-6)


def test_evaluation_without_grad_gives_the_same_loss():
    model = tiny("llama", {"target_modules": "all-linear"})
    step = FusedStep(model, model_parts(model, 256), torch.float32, compile=False)
    b = PaddingFreeCollator()(rows())
    with_grad = step(**b).loss.item()
    model.eval()
    with torch.no_grad():
        assert step(**b).loss.item() == pytest.approx(with_grad, rel=1e-6)


def test_gradient_checkpointing_recomputes_to_the_same_gradients():
    model = tiny("llama", {"target_modules": "all-linear"})
    ref = copy.deepcopy(model)
    b = PaddingFreeCollator()(rows())
    FusedStep(ref, model_parts(ref, 256), torch.float32, compile=False)(**b).loss.backward()
    model.get_base_model().gradient_checkpointing_enable()
    model.train()
    FusedStep(model, model_parts(model, 256), torch.float32, compile=False)(**b).loss.backward()
    for name, g in _grads(ref).items():
        torch.testing.assert_close(_grads(model)[name], g, msg=name)


def test_a_failed_compile_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = tiny("llama", {"target_modules": "all-linear"})
    ref = FusedStep(copy.deepcopy(model), model_parts(model, 256), torch.float32, compile=False)
    step = FusedStep(model, model_parts(model, 256), torch.float32, compile=True)
    b = PaddingFreeCollator()(rows())
    assert step(**b).loss.item() == pytest.approx(ref(**b).loss.item(), rel=1e-6)
    step(**b)
    notes = [line for line in capsys.readouterr().out.splitlines() if "torch.compile" in line]
    assert len(notes) == 4 and all("running it eagerly" in n for n in notes)  # one per compiled function, once
