"""Batches, the chunked loss, attention per document, and which models the fused step refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.train.fast.models import rows, tiny
from train.fast import loss as fast_loss
from train.fast.attention import causal_varlen, per_document
from train.fast.collate import PaddingFreeCollator
from train.fast.plan import Unsupported, model_parts


def test_collator_lays_rows_end_to_end_with_per_document_targets():
    batch = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
             {"input_ids": [4, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8], "position_ids": [0, 1, 0, 1, 2]}]
    b = PaddingFreeCollator()(batch)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 8] and b["max_seqlen"] == 3
    # targets never cross a document boundary: the last token of each document has none
    assert b["shift_labels"].tolist() == [[2, 3, -100, -100, -100, 7, 8, -100]]
    assert b["target_positions"].tolist() == [0, 1, 5, 6]


def test_collator_pads_to_a_multiple_as_a_document_without_targets():
    b = PaddingFreeCollator(pad_to_multiple_of=8)(rows((5, 6)))
    assert b["input_ids"].shape[1] == 16 and b["cu_seqlens"].tolist() == [0, 5, 11, 16]
    assert (b["shift_labels"][0, 11:] == -100).all()


def test_chunked_linear_cross_entropy_matches_the_full_logits(monkeypatch):
    monkeypatch.setattr(fast_loss, "ELEMENTS_PER_CHUNK", 64 * 50)  # several chunks of 64 rows
    torch.manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    got = fast_loss.linear_cross_entropy(h, w, t)
    (got * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t, reduction="sum")
    (ref * 0.5).backward()
    # the loss and softmax are computed in fp32 (whatever the input dtype), so compare at fp32 precision
    torch.testing.assert_close(got, ref, check_dtype=False, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_a_batch_without_targets_gives_zero_loss_and_zero_gradients():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    out = fast_loss.linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(w.grad) == 0


def test_per_document_attention_equals_a_block_diagonal_causal_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    cu = torch.tensor([0, 6, 13, 20], dtype=torch.int32)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([6, 7, 7]))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(per_document(q, k, v, cu), ref)
    torch.testing.assert_close(causal_varlen(q, k, v, cu, 7), ref)  # CPU: the fallback is what runs


@pytest.mark.parametrize("arch,config,why", [
    ("gpt2", {}, "architecture 'gpt2'"),
    ("llama", {"hidden_act": "gelu"}, "SwiGLU"),
    ("mistral", {"sliding_window": 64}, "sliding-window"),
])
def test_models_the_fused_step_does_not_cover_are_refused_with_the_reason(arch, config, why):
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "gpt2":
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    else:
        m = tiny(arch, None, **config)
    with pytest.raises(Unsupported, match=why):
        model_parts(m, 256)


def test_dora_and_unequal_lora_settings_within_a_group_are_refused():
    with pytest.raises(Unsupported, match="DoRA"):
        model_parts(tiny("llama", {"target_modules": "all-linear", "use_dora": True}), 256)
    m = tiny("llama", {"target_modules": "all-linear", "rank_pattern": {"k_proj": 8}})
    with pytest.raises(Unsupported, match="rank, scale or dropout differ"):
        model_parts(m, 256)
