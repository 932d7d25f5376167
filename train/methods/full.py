"""Full fine-tuning: every weight trains; the output is a full model folder."""

from __future__ import annotations

from train.config import MethodConfig
from train.methods.base import Method


class FullFineTuning(Method):
    name = "full"
    saves_adapter = False

    def prepare(self, model, cfg: MethodConfig):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
