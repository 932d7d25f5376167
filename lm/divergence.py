"""KL divergence between two models' next-token distributions: distillation's loss and retention's drift.

One definition for both: `train/methods/losses.py` trains a student towards a teacher with it, and
`lm/retention.py` measures how far a tuned model drifted from its base on general prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_T || q_T) for logits of shape (N, V), both softened by the temperature."""
    p = F.log_softmax(p_logits.float() / temperature, dim=-1)
    q = F.log_softmax(q_logits.float() / temperature, dim=-1)
    return (p.exp() * (p - q)).sum(-1).mean()
