"""Pure-PyTorch preference losses: the DPO family, the Bradley-Terry reward-model loss, per-sequence log-probs.

These are O(batch) computations on per-sequence log-probs: there is nothing to fuse at this level, so the
public ops in :mod:`fastalign.ops.preference` validate their inputs and call these functions, and the fused
losses from hidden states (:mod:`fastalign.ops.linear_losses`) differentiate them to get per-token gradients.

Notation (per pair i of a batch of B pairs):
    pi_c, pi_r      policy log-probs of the chosen / rejected response (sum over its tokens, or mean)
    ref_c, ref_r    the same under the frozen reference model
    L_c, L_r        response lengths in tokens
    p_c = pi_c / L_c, q_c = ref_c / L_c (and _r alike) for a length-normalised loss type, else p = pi, q = ref
    r_c = p_c - q_c, r_r = p_r - q_r (the log-ratios),  d = r_c - r_r,  u = beta * d
    eps = label_smoothing;  cdpo(x) = -(1 - eps) log sig(x) - eps log sig(-x)

Loss types (per pair; the batch loss is the mean over pairs; several types combine as sum_k w_k mean(l_k)):
    sigmoid       cdpo(u)                                     DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7);
                                                              eps > 0 is conservative DPO (cDPO, Mitchell 2023)
    sigmoid_norm  cdpo(u), always length-normalised           length-normalised DPO (as in Tulu 3, Lambert et al.
                                                              2024, arXiv:2411.15124)
    robust        (-(1 - eps) log sig(u) + eps log sig(-u)) / (1 - 2 eps)
                                                              rDPO (Chowdhury et al. 2024, arXiv:2403.00409, eq. 8)
    hinge         relu(1 - u)                                 SLiC-HF (Zhao et al. 2023, arXiv:2305.10425)
    ipo           (d - 1 / (2 beta))^2, length-normalised by default
                                                              IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17)
    exo_pair      sig(u) (log sig(u) - log(1 - eps)) + sig(-u) (log sig(-u) - log eps),  0 < eps < 1
                                                              EXO (Ji et al. 2024, arXiv:2402.00856, eq. 16)
    nca_pair      -log sig(beta r_c) - 0.5 log sig(-beta r_c) - 0.5 log sig(-beta r_r)
                                                              NCA (Chen et al. 2024, arXiv:2402.05369)
    bco_pair      -log sig(beta r_c) - log sig(-beta r_r)     BCO (Jung et al. 2024, arXiv:2404.04656)
    sppo_hard     (r_c - 1 / (2 beta))^2 + (r_r + 1 / (2 beta))^2
                                                              SPPO, hard labels (Wu et al. 2024, arXiv:2405.00675)
    aot           cdpo(beta (sort(p_c - p_r) - sort(q_c - q_r))), sorted over the batch
    aot_unpaired  cdpo(beta (sort(r_c) - sort(r_r)))          AOT (Melnyk et al. 2024, arXiv:2406.05882)
    apo_zero      1 - sig(beta r_c) + sig(beta r_r)           APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266,
                                                              eq. 7)
    apo_down      sig(beta r_c) + 1 - sig(beta (r_c - r_r))   APO-down (the same paper, eq. 8)
    discopop      (1 - m) (-log sig(u)) + m exp(-u),  m = sig(u / tau)
                                                              DiscoPOP (Lu et al. 2024, arXiv:2406.08414, eq. 5)
    sft           -(sum_i pi_c,i) / (sum_i L_c,i): the NLL per chosen token of the batch (needs sums and lengths),
                  the same value for every pair                as combined in RPO (Pang et al. 2024,
                                                              arXiv:2404.19733) and MPO (Wang et al. 2024,
                                                              arXiv:2411.10442)
    simpo         cdpo(beta (p_c - p_r) - gamma), no reference model, length-normalised
                                                              SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6)

Every type but simpo and sft needs the reference; each formula is TRL 1.16's ``DPOTrainer`` line for that type
(``sigmoid`` adds cDPO's eps, which TRL's ``sigmoid`` does not take; ``discopop``'s m exp(-u) is computed as
exp(log sig(u / tau) - u), the same number without the inf * 0 of very negative u). ``aot`` and
``aot_unpaired`` sort within the batch they are given: with several micro-batches, within each one, as TRL.

Length normalisation (``length_normalize``): None follows TRL: ``sigmoid_norm``, ``ipo`` and ``simpo`` divide
by the lengths when they are given, the others never do; True divides every type; False none. ``sft`` uses the
lengths only to count tokens.

Implicit rewards (logged): beta (pi - ref) per sequence (beta p without a reference, e.g. simpo), as TRL logs them.
Accuracy counts a pair as won only when its reward margin is above rounding (:func:`reward_accuracy`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "sigmoid_norm", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "simpo")
LENGTH_NORMALIZED = ("sigmoid_norm", "ipo", "simpo")  # divided by the lengths under length_normalize=None (TRL)
REFERENCE_FREE = ("simpo", "sft")
SMOOTHED = ("sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")  # read label_smoothing
DISCOPOP_TAU = 0.05  # the DiscoPOP paper's (and TRL's) default
# A pair is won only when its margin exceeds this many units of rounding of the numbers it is computed from
# (see reward_accuracy): the fused policy pass and the reference pass of the same weights differ by rounding
# (measured: up to 0.4 ulp of the summed magnitudes on the tiny model; 16 leaves room for long sums).
TIE_ULPS = 16


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


def loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """``loss_type`` as a tuple of names (a single name, or a list of them for a weighted combination)."""
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def normalizes(loss_type: str, length_normalize: bool | None) -> bool:
    """Whether ``loss_type`` divides log-probs by the response lengths (when lengths are given)."""
    if loss_type == "sft":
        return False  # the lengths count tokens; the NLL is never rescaled
    if loss_type == "sigmoid_norm" or length_normalize is True:
        return True
    return length_normalize is None and loss_type in LENGTH_NORMALIZED


def needs_reference(loss_type: str | Sequence[str]) -> bool:
    return any(t not in REFERENCE_FREE for t in loss_types(loss_type))


def _cdpo(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


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
    discopop_tau: float = DISCOPOP_TAU,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards of one DPO-family type (formulas in the module docstring).

    Args:
        chosen_logps, rejected_logps: (B,) float policy log-probs per sequence.
        ref_chosen_logps, ref_rejected_logps: (B,) float reference log-probs; None only for simpo and sft.
        beta: > 0 inverse temperature (IPO's tau).
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: eps (the types in ``SMOOTHED``).
        gamma: SimPO's target reward margin. discopop_tau: DiscoPOP's tau.
        chosen_lengths, rejected_lengths: (B,) response lengths. When given, the log-probs are divided by them
            (the caller decides per type: :func:`normalizes`); ``sft`` and ``sigmoid_norm`` need them.
    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,), in the promoted float dtype of the inputs.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type in ("sft", "sigmoid_norm") and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths")
    eps = label_smoothing
    if loss_type == "sft":
        # the mean NLL over every chosen token of the batch, given to each pair (TRL expands it the same way)
        tokens = chosen_lengths.sum().clamp(min=1).to(chosen_logps.dtype)
        nll = -chosen_logps.sum() / tokens
        losses = nll.expand(chosen_logps.shape[0])
        if ref_chosen_logps is not None:
            return losses, beta * (chosen_logps - ref_chosen_logps).detach(), \
                beta * (rejected_logps - ref_rejected_logps).detach()
        return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()

    scale = chosen_lengths is not None
    p_c = chosen_logps / chosen_lengths.to(chosen_logps.dtype) if scale else chosen_logps
    p_r = rejected_logps / rejected_lengths.to(rejected_logps.dtype) if scale else rejected_logps
    if loss_type == "simpo":
        u = beta * (p_c - p_r) - gamma
        return _cdpo(u, eps), beta * p_c.detach(), beta * p_r.detach()

    q_c = ref_chosen_logps / chosen_lengths.to(ref_chosen_logps.dtype) if scale else ref_chosen_logps
    q_r = ref_rejected_logps / rejected_lengths.to(ref_rejected_logps.dtype) if scale else ref_rejected_logps
    r_c, r_r = p_c - q_c, p_r - q_r
    d = r_c - r_r
    u = beta * d
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = _cdpo(u, eps)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - u)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        # KL(softmax over {chosen, rejected} of the implicit rewards || [1 - eps, eps])
        losses = (torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-eps))
                  + torch.sigmoid(-u) * (F.logsigmoid(-u) - math.log(eps)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * r_c) - 0.5 * F.logsigmoid(-beta * r_c) - 0.5 * F.logsigmoid(-beta * r_r)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * r_c) - F.logsigmoid(-beta * r_r)
    elif loss_type == "sppo_hard":
        losses = (r_c - 0.5 / beta) ** 2 + (r_r + 0.5 / beta) ** 2
    elif loss_type == "aot":
        # optimal transport between the batch's policy and reference margin distributions: sorted, not paired
        losses = _cdpo(beta * (torch.sort(p_c - p_r).values - torch.sort(q_c - q_r).values), eps)
    elif loss_type == "aot_unpaired":
        losses = _cdpo(beta * (torch.sort(r_c).values - torch.sort(r_r).values), eps)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * r_c) + torch.sigmoid(beta * r_r)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * r_c) + 1 - torch.sigmoid(beta * (r_c - r_r))
    else:  # discopop
        weight_exp = torch.sigmoid(u / discopop_tau)
        losses = -F.logsigmoid(u) * (1 - weight_exp) + torch.exp(F.logsigmoid(u / discopop_tau) - u)
    # rewards stay sequence-level (not length-normalised), as TRL logs them
    reward_c = chosen_logps - ref_chosen_logps
    reward_r = rejected_logps - ref_rejected_logps
    return losses, beta * reward_c.detach(), beta * reward_r.detach()


def reward_accuracy(reward_c: torch.Tensor, reward_r: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 where the chosen reward wins, 0.0 where it loses or ties (TRL counts ``reward_c > reward_r``).

    A tie is a margin within rounding of zero: ``reward_c - reward_r <= TIE_ULPS * eps * magnitude``, where eps is
    the machine epsilon of the rewards' dtype and ``magnitude`` (B,) is the size of the numbers the margin was
    computed from (beta (|pi_c| + |ref_c| + |pi_r| + |ref_r|) for DPO). When the policy equals the reference (the
    first step), the fused policy pass and the reference pass of the same weights differ by rounding (a fraction of
    an ulp of the summed log-probs): those pairs are ties, not wins, as they are exactly ties in TRL, whose two
    passes run the same code.
    """
    tol = TIE_ULPS * torch.finfo(reward_c.dtype).eps * magnitude.to(reward_c.dtype)
    return ((reward_c - reward_r) > tol).to(reward_c.dtype)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalize: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO-family loss over pairs (a weighted sum of means for several types), and detached stats.

    Equal to ``sum_k loss_weights[k] * dpo_losses(..., loss_type=loss_type[k])[0].mean()``, each type given the
    lengths when :func:`normalizes` says it divides by them (``sft`` always gets them, to count tokens).

    Args:
        loss_type: one name of ``LOSS_TYPES``, or a sequence of them (TRL's list ``loss_type``).
        loss_weights: one weight per type (TRL's ``loss_weights``, e.g. MPO's [0.8, 0.2, 1.0]); None: all 1.
        length_normalize: None (TRL: sigmoid_norm, ipo, simpo), True (every type) or False (none).
        the rest: as :func:`dpo_losses`.
    Returns:
        loss: () float (0 for an empty batch).
        stats: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (means of beta * log-ratio),
        ``rewards/accuracies`` (fraction of pairs won, :func:`reward_accuracy`), ``logps/chosen``,
        ``logps/rejected`` (mean policy log-probs), and ``loss/<type>`` for each type of a combination:
        () detached tensors.
    """
    types = loss_types(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    total, parts, rewards = None, {}, None
    for name, weight in zip(types, weights):
        scaled = normalizes(name, length_normalize) or name == "sft"
        losses, reward_c, reward_r = dpo_losses(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=name,
            label_smoothing=label_smoothing, gamma=gamma, discopop_tau=discopop_tau,
            chosen_lengths=chosen_lengths if scaled else None, rejected_lengths=rejected_lengths if scaled else None,
        )
        term = _mean(losses)
        parts[f"loss/{name}"] = term.detach()
        total = weight * term if total is None else total + weight * term
        if rewards is None or name == "simpo":  # a reference-free combination logs simpo's rewards
            rewards = reward_c, reward_r
    reward_c, reward_r = rewards
    if ref_chosen_logps is not None:  # the margin is beta ((pi_c - ref_c) - (pi_r - ref_r))
        magnitude = beta * (chosen_logps.detach().abs() + rejected_logps.detach().abs()
                            + ref_chosen_logps.detach().abs() + ref_rejected_logps.detach().abs())
    else:  # beta (p_c - p_r): the rewards themselves
        magnitude = reward_c.abs() + reward_r.abs()
    stats = {
        "rewards/chosen": _mean(reward_c),
        "rewards/rejected": _mean(reward_r),
        "rewards/margins": _mean(reward_c - reward_r),
        "rewards/accuracies": _mean(reward_accuracy(reward_c, reward_r, magnitude)),
        "logps/chosen": _mean(chosen_logps.detach()),
        "logps/rejected": _mean(rejected_logps.detach()),
    }
    if len(types) > 1:
        stats.update(parts)
    return total, stats


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
