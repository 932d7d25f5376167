"""Full fine-tuning: every weight trains; the output is a full model folder."""

from __future__ import annotations

from train.methods.base import Method


class FullFineTuning(Method):
    name = "full"
    fused_step = True

    @property
    def saves_adapter(self) -> bool:
        return False

    def prepare(self, model, cfg):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
