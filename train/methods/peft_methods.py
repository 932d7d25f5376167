"""PEFT methods through peft: LoRA, DoRA, IA3, prompt tuning."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from train.config import MethodConfig
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
    def _config(self, model, cfg: MethodConfig):
        ...

    def prepare(self, model, cfg: MethodConfig):
        check_targets(model, cfg.target_modules)
        pm = get_peft_model(model, self._config(model, cfg))
        return pm

    def peft_config(self, model) -> dict[str, Any] | None:
        from artifacts.manifest import jsonable

        return jsonable(model.peft_config["default"].to_dict())


class LoRA(_Peft):
    name = "lora"
    use_dora = False

    def _config(self, model, cfg: MethodConfig):
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, use_dora=self.use_dora, bias="none")


class DoRA(LoRA):
    name = "dora"
    use_dora = True


class IA3(_Peft):
    name = "ia3"

    def _config(self, model, cfg: MethodConfig):
        targets = sorted(linear_module_names(model)) if cfg.target_modules == "all-linear" else cfg.target_modules
        ff = cfg.feedforward_modules or [t for t in targets if t in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp")]
        ff = [t for t in ff if t in targets]
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=ff)


class PromptTuning(_Peft):
    name = "prompt_tuning"

    def prepare(self, model, cfg: MethodConfig):
        return get_peft_model(model, self._config(model, cfg))

    def _config(self, model, cfg: MethodConfig):
        kw: dict[str, Any] = {"task_type": TaskType.CAUSAL_LM, "num_virtual_tokens": cfg.num_virtual_tokens}
        if cfg.prompt_init_text:
            kw.update(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_init_text,
                      tokenizer_name_or_path=model.name_or_path)
        return PromptTuningConfig(**kw)
