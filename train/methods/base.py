"""The method protocol."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from transformers import Trainer

from train.config import MethodConfig


class Method(ABC):
    name = "base"
    saves_adapter = True  # True: writes adapter/ (PEFT format); False: writes full weights to model/

    @abstractmethod
    def prepare(self, model, cfg: MethodConfig):
        """Return the model to train (wrapped, frozen as the method needs)."""
        ...

    def peft_config(self, model) -> dict[str, Any] | None:
        return None

    def trainer_cls(self) -> type[Trainer]:
        return Trainer
