"""Training methods: each is a small pluggable piece that loads and prepares the model and builds its Trainer.

A method owns: loading and wrapping the base model (`load`, `prepare`), what it saves
(`saves_adapter`), its config and data checks, and its Trainer
(`build_trainer`): distillation, preference and RL objectives plug in here without forking the
recipe's steps.
"""

from train.methods.base import ListDataset, Method, TrainerParts
from train.methods.distill import Distill
from train.methods.full import FullFineTuning
from train.methods.peft_methods import DoRA, IA3, LoRA, PromptTuning, QLoRA
from train.methods.preference import DPO, ORPO
from train.methods.rl import GRPO

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoRA, DoRA, IA3, PromptTuning, FullFineTuning, QLoRA,
                                                        Distill, DPO, ORPO, GRPO)}


def get_method(name: str, cfg=None) -> Method:
    return METHODS[name](cfg)


def check_config(cfg) -> None:
    """The chosen method's config checks that need no model or data (ConfigError); train.config validated the rest."""
    METHODS[cfg.method.name].check(cfg)


__all__ = ["METHODS", "ListDataset", "Method", "TrainerParts", "check_config", "get_method"]
