"""On-policy distillation through TRL's GKD trainer (`distill_mode: online`, `on_policy > 0`).

With probability on_policy a batch is the student's own samples, scored token by token by the
teacher; beta=0 makes GKD's generalised JSD the forward KL(teacher || student) of the offline loss.
"""

from __future__ import annotations

from transformers import Trainer

from train.methods.base import TrainerParts


def build_gkd_trainer(parts: TrainerParts, teacher) -> Trainer:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    m = parts.cfg.method
    rows = [{"messages": ex.messages} for ex in parts.splits.train]
    val = [{"messages": ex.messages} for ex in parts.splits.validation]
    args = parts.make_args(GKDConfig, temperature=m.temperature, lmbda=m.on_policy, beta=0.0,
                           max_new_tokens=m.max_completion_length, max_length=parts.cfg.data.max_length)
    return GKDTrainer(model=parts.model, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                      eval_dataset=Dataset.from_list(val) if val else None, processing_class=parts.tok,
                      callbacks=parts.callbacks)
