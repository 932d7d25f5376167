"""Which models the fused step can run, and the parts of the model it reads.

The fused step (decoder.py) re-implements the forward of the Llama family (Llama, Qwen2, Mistral:
RMSNorm, rotary positions, grouped-query attention, SwiGLU) on the model's own parameters. A model
it does not cover exactly gets a reason here, and training falls back to the transformers forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ARCHITECTURES = ("llama", "qwen2", "mistral")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class Unsupported(Exception):
    """The fused step cannot run this model exactly; the message says why."""


@dataclass
class LoraParts:
    A: nn.Parameter  # [r, in]
    B: nn.Parameter  # [out, r]
    scale: float
    dropout: float


@dataclass
class Proj:
    name: str
    linear: nn.Linear  # the frozen or trainable base projection
    lora: LoraParts | None


@dataclass
class LayerParts:
    ln_in: nn.Parameter
    ln_post: nn.Parameter
    groups: list[list[Proj]]  # qkv, o, gate_up, down


@dataclass
class ModelParts:
    lm: nn.Module  # the transformers causal LM (inside the peft model, if any)
    config: object
    embed: nn.Embedding
    layers: list[LayerParts]
    norm: nn.Parameter
    head: nn.Linear
    rotary: nn.Module
    eps: float
    heads: int
    kv_heads: int
    head_dim: int


def _lora(mod: nn.Module, where: str) -> Proj:
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(mod) is nn.Linear:
        return Proj(where, mod, None)
    if type(mod) is not LoraLinear:
        raise Unsupported(f"{where} is a {type(mod).__name__} (quantised or another adapter type)")
    names = list(mod.lora_A.keys())
    if len(names) != 1 or mod.merged or mod.disable_adapters:
        raise Unsupported(f"{where}: one active, unmerged LoRA adapter is needed")
    name = names[0]
    if mod.use_dora.get(name) or mod.lora_bias.get(name):
        raise Unsupported(f"{where}: DoRA and LoRA bias are not fused")
    if type(mod.base_layer) is not nn.Linear:
        raise Unsupported(f"{where}: the base layer is a {type(mod.base_layer).__name__}")
    drop = mod.lora_dropout[name]
    return Proj(where, mod.base_layer, LoraParts(mod.lora_A[name].weight, mod.lora_B[name].weight,
                                                 float(mod.scaling[name]), getattr(drop, "p", 0.0)))


def _check_config(c, max_length: int) -> None:
    if c.model_type not in ARCHITECTURES:
        raise Unsupported(f"architecture {c.model_type!r} (the fused step covers {', '.join(ARCHITECTURES)})")
    if getattr(c, "hidden_act", "silu") != "silu" or getattr(c, "mlp_bias", False):
        raise Unsupported("an MLP other than bias-free SwiGLU")
    if getattr(c, "pretraining_tp", 1) != 1 or getattr(c, "attention_dropout", 0.0):
        raise Unsupported("pretraining_tp > 1 or attention dropout")
    window = getattr(c, "sliding_window", None)
    if (getattr(c, "use_sliding_window", c.model_type == "mistral") and window and window < max_length):
        raise Unsupported(f"sliding-window attention ({window} < data.max_length {max_length})")


def _layer(layer: nn.Module, i: int) -> LayerParts:
    attn, mlp = layer.self_attn, layer.mlp
    mods = {**{n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            **{n: getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}}
    groups = [[_lora(mods[n], f"layers.{i}.{n}") for n in g] for g in GROUPS]
    for g in groups:
        loras = [p.lora for p in g if p.lora]
        if len({(lo.scale, lo.dropout, lo.A.shape[0]) for lo in loras}) > 1:
            raise Unsupported(f"layers.{i}: LoRA rank, scale or dropout differ within {[p.name for p in g]}")
    return LayerParts(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, groups)


def model_parts(model: nn.Module, max_length: int) -> ModelParts:
    """The parts of `model` (a transformers causal LM, or a peft model around one) the fused step uses."""
    from peft import PeftModel

    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    c = lm.config
    _check_config(c, max_length)
    core, head = lm.model, lm.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        raise Unsupported("an output head other than a bias-free linear layer (adapted or quantised head)")
    if type(core.embed_tokens) is not nn.Embedding:
        raise Unsupported("an adapted or quantised embedding")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return ModelParts(lm, c, core.embed_tokens, [_layer(layer, i) for i, layer in enumerate(core.layers)],
                      core.norm.weight, head, core.rotary_emb, float(c.rms_norm_eps), heads,
                      c.num_key_value_heads or heads, head_dim)


def compute_dtype(precision: str | None) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "", torch.float32)
