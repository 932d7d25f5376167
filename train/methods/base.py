"""The method protocol: what a training method owns, and what the recipe hands it.

A method owns loading and wrapping the model (`load`, `prepare`), what it saves (`saves_adapter`),
its config and data checks, and its Trainer (`build_trainer`): plain
next-token loss by default; distillation, preference and RL methods bring their own Trainer
(TRL's where it fits) without forking the recipe's steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import Trainer, TrainingArguments

from artifacts import RunDir
from lm.data.formats import Example
from lm.data.prepare import Splits
from lm.loading import load_model
from lm.padding import Collator
from train.fast.install import install

if TYPE_CHECKING:
    from train.config import Config, MethodConfig


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class TrainerParts:
    """Everything the recipe prepared for a method's Trainer."""

    cfg: "Config"
    model: Any
    tok: Any
    splits: Splits
    train_feats: list[dict]
    val_feats: list[dict]
    callbacks: list
    run_dir: RunDir
    make_args: Callable[..., TrainingArguments]  # make_args(ArgsClass, **method_fields) -> the run's arguments

    def collator(self) -> Collator:
        return Collator(self.tok.pad_token_id, self.cfg.data.pad_to_multiple_of)


class Method(ABC):
    name = "base"
    fused_step = False  # True: the plain next-token loss may run on train/fast's fused step (when the model is covered)
    # True: extra_scores is a function of the model and the data alone, so the base's scores may be reused
    # (train/base_scores.py); False where it runs the user's code (reward functions), which may change
    scores_reusable = True

    def __init__(self, cfg: "MethodConfig | None" = None):
        self.cfg = cfg

    @property
    def saves_adapter(self) -> bool:
        """True: writes adapter/ (PEFT format); False: writes full weights to model/."""
        return True

    @classmethod
    def check(cls, cfg: "Config") -> None:
        """Config checks that need no model or data; raise ConfigError."""

    def check_setup(self, cfg: "Config", model_path: str, tok, splits: Splits) -> None:
        """Checks once the tokenizer and data are loaded, before anything is written."""

    def load(self, path: str, dtype: torch.dtype, cfg: "Config"):
        return load_model(path, dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation)

    @abstractmethod
    def prepare(self, model, cfg: "MethodConfig"):
        """Return the model to train (wrapped, frozen as the method needs)."""
        ...

    def peft_config(self, model) -> dict[str, Any] | None:
        return None

    def build_trainer(self, parts: TrainerParts) -> Trainer:
        collator, fields = parts.collator(), {}
        fast = install(parts.model, parts.cfg) if self.fused_step else None
        if fast is not None:
            # The fused step's batches are padding-free; a NaN check per step would sync the GPU every step.
            collator, fields = fast.collator, {"logging_nan_inf_filter": False}
        return Trainer(model=parts.model, args=parts.make_args(TrainingArguments, **fields),
                       train_dataset=ListDataset(parts.train_feats),
                       eval_dataset=ListDataset(parts.val_feats) if parts.val_feats else None,
                       data_collator=collator, callbacks=parts.callbacks)

    def extra_scores(self, model, tok, examples: list[Example], preds: list[str]) -> dict[str, float]:
        """Method-specific held-out metrics (preference accuracy, reward), for base and tuned alike."""
        return {}
