"""Preference training on prompt/chosen/rejected pairs with TRL: DPO and ORPO, LoRA on the base.

DPO's reference is the base with the adapter disabled (TRL wraps the model from our LoRA config
and disables the adapter for the reference pass): no second copy of the model in memory. ORPO
needs no reference at all.
"""

from __future__ import annotations

from transformers import Trainer

from lm.data.formats import Example
from lm.errors import ConfigError
from lm.evaluation import preference_scores
from train.methods.base import TrainerParts
from train.methods.peft_methods import TrlLoRA


def pair_rows(examples: list[Example]) -> list[dict]:
    """TRL's conversational preference rows."""
    return [{"prompt": ex.messages[:-1], "chosen": [ex.messages[-1]],
             "rejected": [{"role": "assistant", "content": ex.rejected}]} for ex in examples]


class _Preference(TrlLoRA):
    def check_setup(self, cfg, model_path, tok, splits) -> None:
        if splits.format != "preference":
            raise ConfigError(f"{cfg.data.train}:1: rejected: method {self.name} trains on preference pairs "
                              f"(prompt/chosen/rejected); this file is {splits.format}")

    def extra_scores(self, model, tok, examples, preds) -> dict[str, float]:
        pairs = [ex for ex in examples if ex.rejected is not None]
        return preference_scores(model, tok, pairs) if pairs else {}

    def _datasets(self, parts: TrainerParts):
        from datasets import Dataset

        val = parts.splits.validation
        return Dataset.from_list(pair_rows(parts.splits.train)), Dataset.from_list(pair_rows(val)) if val else None


class DPO(_Preference):
    name = "dpo"

    def build_trainer(self, parts: TrainerParts) -> Trainer:
        from trl import DPOConfig, DPOTrainer

        train, val = self._datasets(parts)
        args = parts.make_args(DPOConfig, beta=self.cfg.beta, max_length=parts.cfg.data.max_length)
        return DPOTrainer(model=parts.model, ref_model=None, args=args, train_dataset=train, eval_dataset=val,
                          processing_class=parts.tok, callbacks=parts.callbacks, peft_config=self.lora_config)


class ORPO(_Preference):
    name = "orpo"

    def build_trainer(self, parts: TrainerParts) -> Trainer:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        train, val = self._datasets(parts)
        args = parts.make_args(ORPOConfig, beta=self.cfg.beta, max_length=parts.cfg.data.max_length)
        return ORPOTrainer(model=parts.model, args=args, train_dataset=train, eval_dataset=val,
                           processing_class=parts.tok, callbacks=parts.callbacks, peft_config=self.lora_config)
