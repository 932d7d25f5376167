"""PEFT methods through peft: LoRA, DoRA, IA3, prompt tuning."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from lm.errors import ConfigError
from train.methods.base import Method


def linear_module_names(model) -> set[str]:
    """Leaf names of the linear layers PEFT can target (the output head excluded)."""
    out = set()
    out_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb:
            out.add(name.split(".")[-1])
    return out


def check_targets(model, targets: Any) -> None:
    """A target module missing from the model is a config error, never a silent no-op."""
    if targets == "all-linear":
        return
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"config: method.target_modules: {missing} not in this model; "
                          f"linear layers are {sorted(linear_module_names(model))}")


class _Peft(Method):
    @abstractmethod
    def _config(self, model, cfg):
        ...

    def prepare(self, model, cfg):
        check_targets(model, cfg.target_modules)
        pm = get_peft_model(model, self._config(model, cfg))
        return pm

    def peft_config(self, model) -> dict[str, Any] | None:
        from artifacts.manifest import jsonable

        return jsonable(model.peft_config["default"].to_dict())


class LoRA(_Peft):
    name = "lora"
    use_dora = False
    fused_step = True

    def _config(self, model, cfg):
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, use_dora=self.use_dora, bias="none")


class TrlLoRA(LoRA):
    """LoRA handed to a TRL trainer as peft_config, the model unwrapped: TRL then uses the base with the
    adapter disabled as the reference (given a PeftModel it would add and save a second 'ref' adapter)."""

    def prepare(self, model, cfg):
        check_targets(model, cfg.target_modules)
        self.lora_config = self._config(model, cfg)
        return model


class DoRA(LoRA):
    name = "dora"
    use_dora = True
    fused_step = False  # DoRA's magnitude vector is not in the fused step


class IA3(_Peft):
    name = "ia3"

    def _config(self, model, cfg):
        targets = sorted(linear_module_names(model)) if cfg.target_modules == "all-linear" else cfg.target_modules
        ff = cfg.feedforward_modules or [t for t in targets if t in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp")]
        ff = [t for t in ff if t in targets]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)


class PromptTuning(_Peft):
    name = "prompt_tuning"

    def prepare(self, model, cfg):
        return get_peft_model(model, self._config(model, cfg))

    def _config(self, model, cfg):
        kw: dict[str, Any] = {"task_type": TaskType.CAUSAL_LM, "num_virtual_tokens": cfg.num_virtual_tokens}
        if cfg.prompt_init_text:
            kw.update(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_init_text,
                      tokenizer_name_or_path=model.name_or_path)
        return PromptTuningConfig(**kw)


def bitsandbytes_missing() -> str | None:
    """Why QLoRA cannot run here, or None. bitsandbytes >= 0.46 runs NF4 on the CPU too."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library (RuntimeError/OSError)
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


class QLoRA(LoRA):
    """The frozen base in 4-bit NF4 (bitsandbytes), LoRA on top; the adapter serves on the full-precision base."""

    name = "qlora"
    fused_step = False  # the 4-bit base layers run bitsandbytes' kernels

    @classmethod
    def check(cls, cfg) -> None:
        why = bitsandbytes_missing()
        if why:
            raise ConfigError(f"config: method.name: qlora needs bitsandbytes (pip install 'tunestack[qlora]'); "
                              f"importing it failed: {why}")

    def load(self, path, dtype, cfg):
        from transformers import AutoModelForCausalLM

        from lm.loading import device

        quant = nf4_config(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=quant.bnb_4bit_compute_dtype, device_map={"": str(device())},
            trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)

    def prepare(self, model, cfg):
        # Frozen in the compute dtype. peft's prepare_model_for_kbit_training would upcast embeddings, head and
        # norms to fp32: +4 GiB on a 7B (bench/qlora_memory.py: 0.65x LoRA's peak with it, 0.46x without).
        model.requires_grad_(False)
        model.enable_input_require_grads()  # gradient checkpointing still reaches the adapters
        return super().prepare(model, cfg)


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's recipe: NF4 weights, double-quantised scales, matmuls in the compute dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
