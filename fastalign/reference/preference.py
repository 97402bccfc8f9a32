"""Pure-PyTorch preference losses: the DPO family, the Bradley-Terry reward-model loss, per-sequence log-probs.

These are O(batch) computations on per-sequence log-probs: there is nothing to fuse at this level, so the
public ops in :mod:`fastalign.ops.preference` validate their inputs and call these functions, and the fused
losses from hidden states (:mod:`fastalign.ops.linear_losses`) differentiate them to get per-token gradients.

Notation (per pair i of a batch of B pairs):
    pi_c, pi_r      policy log-probs of the chosen / rejected response (sum over its tokens, or mean)
    ref_c, ref_r    the same under the frozen reference model
    L_c, L_r        response lengths in tokens (only when length normalisation is asked for)
    s_c = (pi_c - ref_c) / L_c,  s_r = (pi_r - ref_r) / L_r          (L = 1 without normalisation)
    d = s_c - s_r,  u = beta * d

Loss types (per pair; the batch loss is the mean over pairs):
    sigmoid  -(1 - eps) log sig(u) - eps log sig(-u)              DPO (Rafailov et al. 2023, eq. 7); eps > 0 is
                                                                  conservative DPO (cDPO, Mitchell 2023)
    robust   (-(1 - eps) log sig(u) + eps log sig(-u)) / (1 - 2 eps)   rDPO (Chowdhury et al. 2024, eq. 8)
    hinge    relu(1 - u)                                          SLiC-HF (Zhao et al. 2023)
    ipo      (d - 1 / (2 beta))^2                                 IPO (Azar et al. 2023, eq. 17); TRL normalises
                                                                  by length (pass the lengths to match it)
    simpo    -(1 - eps) log sig(u') - eps log sig(-u'),  u' = beta (pi_c / L_c - pi_r / L_r) - gamma
                                                                  SimPO (Meng et al. 2024, eq. 6): no reference
                                                                  model, length-normalised, target margin gamma
Implicit rewards (logged): beta (pi - ref) per sequence (beta pi / L for simpo), as TRL logs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of token log-probs over the response tokens of each sequence.

    Equal to ``(logprobs * mask).sum(-1)`` (divided by ``mask.sum(-1).clamp(min=1)`` when ``average``), except that
    masked positions are dropped with ``torch.where``, so a NaN or -inf there (padding) does not leak in.

    Args:
        logprobs: (B, T) float token log-probs.
        mask: (B, T) bool or 0/1; non-zero marks a response token.
        average: mean over the response tokens instead of the sum (0 for a sequence without any).
    Returns:
        (B,) in the dtype of ``logprobs``.
    """
    keep = mask != 0
    total = torch.where(keep, logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)).sum(-1)
    if average:
        total = total / keep.sum(-1).clamp(min=1).to(total.dtype)
    return total


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards of the DPO family (formulas in the module docstring).

    Args:
        chosen_logps, rejected_logps: (B,) float policy log-probs per sequence.
        ref_chosen_logps, ref_rejected_logps: (B,) float reference log-probs; None (only) for ``simpo``.
        beta: > 0 inverse temperature (IPO's tau).
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: eps, the assumed label-flip probability (sigmoid, robust, simpo).
        gamma: SimPO's target reward margin.
        chosen_lengths, rejected_lengths: (B,) response lengths; when given, log-ratios are divided by them.
    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,), in the promoted float dtype of the inputs.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "simpo":
        chosen_ratio, rejected_ratio = chosen_logps, rejected_logps
    else:
        chosen_ratio = chosen_logps - ref_chosen_logps
        rejected_ratio = rejected_logps - ref_rejected_logps
    chosen_score, rejected_score = chosen_ratio, rejected_ratio
    if chosen_lengths is not None:
        chosen_score = chosen_score / chosen_lengths.to(chosen_score.dtype)
    if rejected_lengths is not None:
        rejected_score = rejected_score / rejected_lengths.to(rejected_score.dtype)
    delta = chosen_score - rejected_score
    u = beta * delta
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - u)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:  # simpo
        u = u - gamma
        losses = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    # SimPO's implicit reward is the (length-normalised) policy log-prob itself
    reward_c = chosen_score if loss_type == "simpo" else chosen_ratio
    reward_r = rejected_score if loss_type == "simpo" else rejected_ratio
    return losses, beta * reward_c.detach(), beta * reward_r.detach()


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO-family loss over pairs, and detached stats (TRL's names).

    Returns:
        loss: () float, the mean of :func:`dpo_losses` (0 for an empty batch).
        stats: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (means of beta * log-ratio),
        ``rewards/accuracies`` (fraction of pairs with chosen reward > rejected reward), ``logps/chosen``,
        ``logps/rejected`` (mean policy log-probs): () detached tensors.
    """
    losses, reward_c, reward_r = dpo_losses(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, gamma=gamma, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    loss = _mean(losses)
    stats = {
        "rewards/chosen": _mean(reward_c),
        "rewards/rejected": _mean(reward_r),
        "rewards/margins": _mean(reward_c - reward_r),
        "rewards/accuracies": _mean((reward_c > reward_r).to(reward_c.dtype)),
        "logps/chosen": _mean(chosen_logps.detach()),
        "logps/rejected": _mean(rejected_logps.detach()),
    }
    return loss, stats


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1; Llama 2's margin variant, Touvron et al. 2023).

    Equal to ``-F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()``, plus
    ``center_rewards_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()`` when set (Eisenstein et al. 2023,
    as TRL's ``center_rewards_coefficient``).

    Args:
        chosen_rewards, rejected_rewards: (B,) float scalar rewards of each pair.
        margin: None, a float, or (B,) float: how far the chosen reward should exceed the rejected one.
    Returns:
        loss () float (0 for an empty batch); stats ``accuracy`` (chosen > rejected), ``margin`` (mean of
        chosen - rejected), ``rewards/chosen``, ``rewards/rejected`` (means): () detached tensors.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = _mean(-F.logsigmoid(diff))
    if center_rewards_coef is not None:
        loss = loss + center_rewards_coef * _mean((chosen_rewards + rejected_rewards) ** 2)
    gap = (chosen_rewards - rejected_rewards).detach()
    stats = {
        "accuracy": _mean((gap > 0).to(gap.dtype)),
        "margin": _mean(gap),
        "rewards/chosen": _mean(chosen_rewards.detach()),
        "rewards/rejected": _mean(rejected_rewards.detach()),
    }
    return loss, stats


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (with zero gradient), not NaN, for an empty tensor."""
    if x.numel() == 0:
        return x.sum()
    return x.mean()
