"""The lean decoder gives transformers'/peft's numbers: mixed-adapter, left-padded, prefill then decode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config, Qwen2ForCausalLM

from serve.engines import decoder
from serve.engines.decoder import KVLayer, LeanDecoder
from tests.serve.conftest import peft_and_fused


def _left_padded(rows: int = 5, t: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 500, (rows, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as the engine batches
    mask[2, :2] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _reference(model, ids, mask, pos, steps: int, **kw) -> torch.Tensor:
    """transformers (or peft) greedy steps: last-position logits per step, (steps, B, vocab)."""
    cache, out = DynamicCache(), []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                           use_cache=True, **kw).logits[:, -1]
            out.append(logits)
            ids, pos = logits.argmax(-1)[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out)


def _lean(dec: LeanDecoder, ids, mask, pos, steps: int) -> torch.Tensor:
    cache, out = None, []
    for _ in range(steps):
        logits, cache = dec.forward(ids, mask, pos, cache)
        out.append(logits)
        ids, pos = logits.argmax(-1)[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out)


def test_mixed_adapter_batch_equals_peft(tiny_model, adapter_runs):
    rows = ["a", None, "b", "a", "b"]
    ref, base, lora = peft_and_fused(tiny_model, adapter_runs)  # b: q/v/o only, slices of the fused q/k/v
    dec = LeanDecoder(base, lora)
    if torch.backends.mkldnn.is_available():
        assert dec.layers[0].qkv.packed is not None and dec.head.packed is not None, "prepacked GEMM not in use"
        assert base.model.layers[0].mlp.up_proj.weight.numel() == 0, "packed weights must replace the originals"
    ids, mask, pos = _left_padded()
    want = _reference(ref, ids, mask, pos, steps=8, adapter_names=[r or "__base__" for r in rows])
    lora.set_rows(rows)
    got = _lean(dec, ids, mask, pos, steps=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want[:, 0] - want[:, 1]).abs().max() > 1e-3, "adapters must actually change the output"


def test_biased_projections_equal_transformers(tmp_path):
    """qwen2: q/k/v carry biases, fused into one."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    for p in base.parameters():  # non-zero biases, identical in both copies
        if p.ndim == 1 and p.abs().sum() == 0:
            p.data.uniform_(-0.5, 0.5)
    ref.load_state_dict(base.state_dict())
    dec = LeanDecoder(base, None)
    ids, mask, pos = _left_padded()
    torch.testing.assert_close(_lean(dec, ids, mask, pos, 6), _reference(ref, ids, mask, pos, 6), atol=1e-4, rtol=1e-4)


def test_bfloat16_equals_transformers_bfloat16(tiny_model, adapter_runs):
    """SERVE_DTYPE=bfloat16: packed bf16 GEMMs, bf16 LoRA; teacher-forced so both see the same tokens."""
    ref, base, lora = peft_and_fused(tiny_model, adapter_runs, dtype=torch.bfloat16)
    assert ref.base_model.model.lm_head.weight.dtype == torch.bfloat16
    dec = LeanDecoder(base, lora)
    # oneDNN packs bf16 only on CPUs with avx512bw/vl/dq or avx_ne_convert; elsewhere (AVX2-only machines)
    # its reorder raises and the projection falls back to F.linear: both paths must match transformers.
    bf16_packs = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (dec.layers[0].gate_up.packed is not None) == bf16_packs
    rows = ["a", None, "b", "a", "b"]
    ids, mask, pos = _left_padded()
    lora.set_rows(rows)
    cache = DynamicCache()
    lean_cache = None
    with torch.inference_mode():
        for _ in range(4):
            want = ref(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                       adapter_names=[r or "__base__" for r in rows]).logits[:, -1].float()
            got, lean_cache = dec.forward(ids, mask, pos, lean_cache)
            scale = want.abs().max()
            assert (got - want).abs().max() <= 0.02 * scale, "bf16 lean forward drifted from transformers' bf16"
            ids, pos = want.argmax(-1)[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_kv_cache_appends_in_place_until_rows_change():
    k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    layer = KVLayer(k.clone(), v.clone())
    steps = [(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)) for _ in range(decoder.SLACK + 3)]
    keys, _ = layer.append(*steps[0])  # the prefill's cache is exact-size: the first append makes room
    first = keys.data_ptr()
    for s in steps[1:decoder.SLACK + 1]:
        keys, values = layer.append(*s)
        assert keys.data_ptr() == first, "a decode step within the spare room must not copy the cache"
    keys, values = layer.append(*steps[decoder.SLACK + 1])  # room exhausted: one new buffer
    assert keys.data_ptr() != first
    want_k = torch.cat([k] + [s[0] for s in steps[:decoder.SLACK + 2]], 2)
    want_v = torch.cat([v] + [s[1] for s in steps[:decoder.SLACK + 2]], 2)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    layer.keys, layer.values = keys[[1]], values[[1]]  # the scheduler drops row 0
    keys, values = layer.append(*[x[[1]] for x in steps[-1]])
    assert torch.equal(keys, torch.cat([want_k[[1]], steps[-1][0][[1]]], 2))
    assert torch.equal(values, torch.cat([want_v[[1]], steps[-1][1][[1]]], 2))


@pytest.mark.parametrize("model_type,extra,reason", [
    ("gpt2", {}, "model type 'gpt2'"),
    ("mistral", {"sliding_window": 4096}, "sliding-window"),
])
def test_unsupported_models_are_named(model_type, extra, reason):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **extra)
    fake = type("M", (), {"config": cfg})()
    assert reason in decoder.unsupported(fake)


def _generate(engine, jobs: list[tuple[str, str | None, int]]) -> list[str]:
    from serve.engines.base import Finished, GenRequest, SamplingParams, TextDelta

    reqs = []
    for prompt, adapter, n in jobs:
        req = GenRequest(prompt_ids=engine.tokenize(prompt), adapter=adapter,
                         params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        engine.submit(req)
        reqs.append(req)
    out = []
    for req in reqs:
        text = ""
        while True:
            ev = req.events.get(timeout=120)
            assert isinstance(ev, (TextDelta, Finished)), ev
            if isinstance(ev, Finished):
                break
            text += ev.text
        out.append(text)
    return out


def test_engine_lean_forward_equals_transformers_forward(tiny_model, adapter_runs):
    """The whole scheduler on both forwards (4 slots for 7 requests of different lengths: rows join a
    running batch and leave it, so the lean cache is merged and re-indexed): the same greedy text."""
    from serve.engines.torch_engine import TorchEngine

    prompts = ["Which dish is vegan?", "Tell me about the soup", "What costs less than ten?", "Spicy?"]
    jobs = [(prompts[i % 4], [None, "a", "b"][i % 3], 3 + 4 * i) for i in range(7)]
    texts = {}
    for lean in (True, False):
        engine = TorchEngine(str(tiny_model), "tiny", max_batch=4, lean=lean)
        try:
            assert (engine.lean is not None) == lean
            engine.load_adapter("a", str(adapter_runs["chef-a"] / "adapter"))
            engine.load_adapter("b", str(adapter_runs["chef-b"] / "adapter"))
            texts[lean] = _generate(engine, jobs)
        finally:
            engine.shutdown()
    assert texts[True] == texts[False]
    assert len(set(texts[True])) > 3
