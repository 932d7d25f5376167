"""Tiny random models and rows for the fused-step tests (built in memory, a few KB)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 300


def tiny(model_type: str = "llama", lora: dict | None = None, **config):
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=True, **config)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if lora is not None:
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora))
        for n, p in m.named_parameters():
            if "lora_B" in n:  # B starts at zero; give it values so the adapter's path is tested too
                torch.nn.init.normal_(p, std=0.05)
    else:
        m.requires_grad_(True)
    return m


def rows(lengths=(7, 19, 12), prompt: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out
