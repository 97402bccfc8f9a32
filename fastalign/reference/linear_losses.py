"""Pure-PyTorch spec of the fused losses from hidden states: the unfused composition each must equal.

    hidden, weight -> logits -> token log-probs (and entropies)        fastalign.reference.logprobs
                   -> per-sequence sums -> the DPO family               fastalign.reference.preference
                   -> PPO surrogate + KL penalty - entropy bonus        fastalign.reference.rl

Two layers:

- ``dpo_loss_from_logprobs`` / ``policy_loss_from_logprobs``: the loss on per-token log-probs. The fused ops in
  :mod:`fastalign.ops.linear_losses` run exactly these (and differentiate them for their per-token upstream
  gradients), so each loss formula is written once, here and in the modules above.
- ``linear_sequence_logprobs`` / ``linear_dpo_loss`` / ``linear_policy_loss``: the same from hidden states through
  materialized logits (:func:`fastalign.reference.logprobs.linear_logprobs_naive`): the tests' oracle.

Notation: B sequences (2B for DPO: B chosen, then the B rejected responses of the same prompts), T positions,
D hidden size, V vocabulary; ``valid`` (B, T) bool marks the tokens that enter the loss.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastalign.reference.logprobs import linear_logprobs_naive
from fastalign.reference.preference import DISCOPOP_TAU, dpo_loss, sequence_logprobs
from fastalign.reference.rl import aggregate, kl_penalty, masked_mean, ppo_policy_loss


def dpo_loss_from_logprobs(
    logprobs: torch.Tensor,
    valid: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    length_normalize: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss of 2B sequences from their token log-probs.

    Equal to::

        seq = sequence_logprobs(logprobs, valid)                                 # (2B,) sums
        lengths = valid.sum(-1)                                                  # used per type (normalizes)
        dpo_loss(seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps, ..., lengths[:B], lengths[B:],
                 length_normalize=length_normalize)

    Args:
        logprobs: (2B, T) float token log-probs; valid: (2B, T) bool response tokens.
        ref_chosen_logps, ref_rejected_logps: (B,) reference sums; None for reference-free types (simpo, sft).
        beta, loss_type, loss_weights, label_smoothing, gamma, discopop_tau: as
            :func:`fastalign.reference.preference.dpo_loss`.
        length_normalize: None: sigmoid_norm, ipo and simpo divide by the response lengths; True: every type;
            False: none.
    Returns:
        loss (); stats: the detached () tensors of :func:`fastalign.reference.preference.dpo_loss`.
    """
    pairs = logprobs.shape[0] // 2
    lengths = valid.sum(-1)
    seq = sequence_logprobs(logprobs, valid)
    return dpo_loss(
        seq[:pairs], seq[pairs:], ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
        loss_weights=loss_weights, label_smoothing=label_smoothing, gamma=gamma, discopop_tau=discopop_tau,
        chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:], length_normalize=length_normalize,
    )


def policy_loss_from_logprobs(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    valid: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO / GRPO actor loss from token log-probs (verl's actor loss; TRL GRPOTrainer's for the same inputs).

    Equal to::

        pg, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, valid, clip_low=..., agg=agg, ...)
        loss = pg + kl_coef * aggregate(kl_penalty(logprobs, ref_logprobs, kind=kl_kind), valid, agg)
                  - entropy_coef * aggregate(entropy, valid, agg)

    Args:
        logprobs: (B, T) float; entropy: (B, T) float or None; valid: (B, T) bool.
        old_logprobs: (B, T), or None for an on-policy batch (the detached ``logprobs``: ratio 1).
        advantages: (B, T) or (B,). ref_logprobs: (B, T) or None (then no KL term and no ``kl`` stat).
    Returns:
        loss (); stats: detached () tensors, those of ``ppo_policy_loss`` plus ``pg_loss``, ``kl`` (mean per-token
        KL, with ``ref_logprobs``) and ``entropy`` (mean, with ``entropy``).
    """
    old_logprobs = logprobs.detach() if old_logprobs is None else old_logprobs
    loss, stats = ppo_policy_loss(
        logprobs, old_logprobs, advantages, valid, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        agg=agg, norm_len=norm_len,
    )
    stats["pg_loss"] = loss.detach()
    if ref_logprobs is not None:
        # zero both sides at masked positions: garbage there would give exp(inf) * 0 = NaN gradients
        kl = kl_penalty(torch.where(valid, logprobs, 0), torch.where(valid, ref_logprobs, 0), kind=kl_kind)
        stats["kl"] = masked_mean(kl.detach(), valid)
        if kl_coef != 0:
            loss = loss + kl_coef * aggregate(kl, valid, agg, norm_len)
    if entropy is not None:
        stats["entropy"] = masked_mean(entropy.detach(), valid)
        if entropy_coef != 0:
            loss = loss - entropy_coef * aggregate(entropy, valid, agg, norm_len)
    return loss, stats


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    average: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """(B,) sums (or means) of the response-token log-probs of hidden (B, T, D) under weight (V, D)."""
    logprobs, _ = linear_logprobs_naive(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index
    )
    return sequence_logprobs(logprobs, labels != ignore_index, average=average)


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    length_normalize: bool | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`dpo_loss_from_logprobs` of hidden (2B, T, D): what :func:`fastalign.linear_dpo_loss` must equal."""
    logprobs, _ = linear_logprobs_naive(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index
    )
    return dpo_loss_from_logprobs(
        logprobs, labels != ignore_index, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
        loss_weights=loss_weights, label_smoothing=label_smoothing, gamma=gamma, discopop_tau=discopop_tau,
        length_normalize=length_normalize,
    )


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`policy_loss_from_logprobs` of hidden (B, T, D): what :func:`fastalign.linear_policy_loss` must equal.

    ``mask`` None means ``labels != ignore_index``; the entropy is computed when ``entropy_coef != 0`` or
    ``return_entropy``.
    """
    logprobs, entropy = linear_logprobs_naive(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index,
        return_entropy=entropy_coef != 0 or bool(return_entropy),
    )
    valid = labels != ignore_index if mask is None else mask != 0
    return policy_loss_from_logprobs(
        logprobs, entropy, valid, old_logprobs, advantages, ref_logprobs, kl_coef=kl_coef, kl_kind=kl_kind,
        entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
        norm_len=norm_len,
    )
