"""Preference losses and the sequence log-probs they compare.

`preference_loss` follows TRL's DPOTrainer conventions, so numbers compare across tools:

    logits  = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    sigmoid = -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls
              (DPO; label smoothing ls > 0 is conservative DPO)
    ipo     = (logits - 1 / (2 * beta))^2
    hinge   = relu(1 - beta * logits)
    rewards = beta * (policy - ref), per side; accuracy = rewards_chosen > rewards_rejected

IPO compares per-token means of the response log-probs (as the IPO paper and TRL do);
sigmoid and hinge compare sums (`for_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlit.model.labels import IGNORE

LOSSES = ("sigmoid", "ipo", "hinge")


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, loss_type: str = "sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over a batch of pairs, and per-pair metrics (detached):
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (1.0 or 0.0)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; expected one of {LOSSES}")
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), {"rewards/chosen": chosen, "rewards/rejected": rejected,
                           "rewards/margins": chosen - rejected, "rewards/accuracies": (chosen > rejected).float()}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of log p(label) over supervised tokens, and their count.
    Labels align with the inputs (position t predicts label t+1), IGNORE where unsupervised."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = -F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return per_token.sum(-1), (labels != IGNORE).sum(-1)


def for_loss(sums: torch.Tensor, counts: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The log-probs a loss compares: per-token means for IPO, sums otherwise."""
    return sums / counts.clamp(min=1) if loss_type == "ipo" else sums
