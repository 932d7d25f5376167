"""The engine's grouped SDPA gives transformers' sdpa numbers on left-padded batches, prefill and decode."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from serve.engines import attention


def _greedy_logits(model, ids, mask, steps: int = 6) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, out = DynamicCache(), []
    with torch.inference_mode():
        for _ in range(steps):
            o = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cache, logits = o.past_key_values, o.logits[:, -1]
            out.append(logits)
            ids, pos = logits.argmax(-1)[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out)


def test_grouped_sdpa_equals_transformers_sdpa(tiny_model):
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    got = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention.NAME).eval()
    assert got.config.num_key_value_heads < got.config.num_attention_heads  # the tiny model is GQA too
    ids = torch.randint(3, 500, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as the engine batches
    mask[2, :2] = 0
    torch.testing.assert_close(_greedy_logits(got, ids, mask), _greedy_logits(ref, ids, mask), atol=1e-5, rtol=1e-5)

