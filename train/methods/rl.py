"""RL with rewards (`method.name: grpo`) through TRL's GRPOTrainer, LoRA on the base.

Rows are prompts with a reference answer (any SFT format: the last assistant turn is the
reference the built-in rewards compare against). Each prompt is sampled num_generations times;
advantages are rewards relative to the group; the KL to the reference (the base with the adapter
disabled) is weighted by kl_beta. TRL logs reward, per-reward means and KL per step through the
Trainer, so they reach metrics.jsonl and TensorBoard like SFT's loss.
"""

from __future__ import annotations

from functools import cached_property

from transformers import Trainer

from lm.errors import ConfigError
from train.methods import rewards
from train.methods.base import TrainerParts
from train.methods.peft_methods import TrlLoRA


def prompt_rows(examples) -> list[dict]:
    return [{"prompt": ex.messages[:-1], "reference": ex.messages[-1]["content"]} for ex in examples]


class GRPO(TrlLoRA):
    name = "grpo"
    scores_reusable = False  # the rewards may be the user's functions: the base is rescored every run

    @classmethod
    def check(cls, cfg) -> None:
        rewards.parse(cfg.method.rewards)  # a missing or broken reward function fails before any loading
        m, t = cfg.method, cfg.training
        if m.num_generations < 2:
            raise ConfigError("config: method.num_generations: >= 2; advantages compare samples within a group")
        if (t.batch_size * t.grad_accum) % m.num_generations:
            raise ConfigError(f"config: training.batch_size: batch_size x grad_accum ({t.batch_size * t.grad_accum}) "
                              f"must be a multiple of method.num_generations ({m.num_generations})")

    @cached_property
    def reward_funcs(self) -> list:
        return rewards.parse(self.cfg.rewards)

    def build_trainer(self, parts: TrainerParts) -> Trainer:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        m = self.cfg
        args = parts.make_args(GRPOConfig, num_generations=m.num_generations,
                               max_completion_length=m.max_completion_length, beta=m.kl_beta, temperature=1.0,
                               eval_strategy="no", log_completions=False)
        return GRPOTrainer(model=parts.model, reward_funcs=self.reward_funcs, args=args,
                           train_dataset=Dataset.from_list(prompt_rows(parts.splits.train)),
                           processing_class=parts.tok, callbacks=parts.callbacks,
                           peft_config=self.lora_config)

    def extra_scores(self, model, tok, examples, preds) -> dict[str, float]:
        return rewards.mean_rewards(self.reward_funcs, [ex.messages[:-1] for ex in examples], preds,
                                    [ex.messages[-1]["content"] for ex in examples])
