"""Distillation loss math on plain tensors (the Trainer subclasses call these; tests check them by hand).

All functions take the student's logits at the supervised positions only: (N, V) for N tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm.divergence import kl_div


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher_T || student_T), both softened by the temperature (online mode)."""
    return kl_div(teacher_logits, student_logits, temperature)


def kl_topk(student_logits: torch.Tensor, teacher_idx: torch.Tensor, teacher_logp: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL on the teacher's top-k support (offline mode): the stored log-probs are renormalised over k.

    sum_k p_k (log p_k - log q_k) with q the student's full-vocabulary distribution, so it is >= 0 and
    equals the full KL when the top-k hold all the teacher's mass.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_idx.long())
    t = F.log_softmax(teacher_logp.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor | None, alpha: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ce): alpha * T^2 * KL + (1 - alpha) * CE. T^2 keeps the KL gradients' scale independent of T."""
    ce = F.cross_entropy(student_logits.float(), labels)
    if kl is None:
        return ce, ce
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, ce


def supervised(logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student logits (N, V), next-token labels (N,), mask (B, T-1)) at the positions that carry a label."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != ignore
    return shift_logits[mask], shift_labels[mask], mask
