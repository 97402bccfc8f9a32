"""The DPO loss on per-sequence log-probs (``fa.dpo_loss``'s family), as the cases that end in it compute it: the
fused losses from hidden states (linear_losses.py) and the e2e DPO step (e2e.py).

Both take a batch laid out as TRL's DPOTrainer lays it: ``[chosen; rejected]`` along dim 0, so ``chunk(2)`` splits
it into the two halves of each pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.reference.preference import dpo_loss as reference_dpo_loss

DPO_BETA = 0.1


def sigmoid_dpo_loss(policy: torch.Tensor, ref: torch.Tensor, beta: float = DPO_BETA) -> torch.Tensor:
    """TRL's ``loss_type="sigmoid"`` line, the loss the non-fastalign rows (plain PyTorch, TRL) end with.

    Equal to ``fastalign.reference.preference.dpo_loss(...)[0]`` (see :func:`dpo_truth_loss`), without the
    reference's stats, which would add a dozen small ops to every peer's timed step.

    Args:
        policy, ref: (2P,) float per-sequence log-prob sums, ``[chosen; rejected]``.
    Returns:
        () loss, the mean over the P pairs.
    """
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def dpo_truth_loss(policy: torch.Tensor, ref: torch.Tensor, beta: float = DPO_BETA) -> torch.Tensor:
    """The truth's DPO loss: fastalign's reference (sigmoid, no label smoothing) on ``[chosen; rejected]`` sums,
    in the precision of its inputs (fp64 on CPU)."""
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    return reference_dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")[0]
