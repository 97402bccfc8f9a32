"""Preference losses on per-sequence log-probs: the DPO family, the Bradley-Terry reward loss, sequence sums.

These are O(batch) element-wise computations: the public functions check their inputs (errors name the
argument) and run the PyTorch reference, which is already optimal here. The fused versions that start from
hidden states (``linear_dpo_loss``, ``linear_sequence_logprobs``) live in :mod:`fastalign.ops.linear_losses`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from fastalign.ops._checks import number, tensor
from fastalign.reference import preference as ref

LOSS_TYPES = ref.LOSS_TYPES


class DPOOptions(NamedTuple):
    """The validated DPO hyper-parameters (what the reference functions take)."""

    loss_type: tuple[str, ...]
    loss_weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    gamma: float
    discopop_tau: float


def check_dpo_options(
    op: str, *, beta, loss_type, label_smoothing, gamma, has_reference: bool, loss_weights=None, discopop_tau=None
) -> DPOOptions:
    """Validate the DPO hyper-parameters; every option either takes effect or raises.

    ``loss_type`` is one name or a non-empty list of names (a weighted sum, TRL's list ``loss_type``);
    ``loss_weights`` one finite number per type (None: all 1); ``discopop_tau`` None means the default 0.05 and
    may only be set with ``discopop``.
    """
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif isinstance(loss_type, (list, tuple)) and loss_type and all(isinstance(t, str) for t in loss_type):
        types = tuple(loss_type)
    else:
        raise ValueError(f"{op}: loss_type must be one of {LOSS_TYPES} or a non-empty list of them, got {loss_type!r}")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"{op}: loss_type must be one of {LOSS_TYPES}, got {unknown[0]!r}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(types):
            got = len(loss_weights) if isinstance(loss_weights, (list, tuple)) else type(loss_weights).__name__
            raise ValueError(f"{op}: loss_weights must hold one number per loss type ({len(types)} for {list(types)}), "
                             f"got {got}")
        weights = tuple(number(op, f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights))
    beta = number(op, "beta", beta)
    if beta <= 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    eps = number(op, "label_smoothing", label_smoothing)
    gamma = number(op, "gamma", gamma)
    smoothed = [t for t in types if t in ref.SMOOTHED]
    if eps != 0 and not smoothed:
        raise ValueError(f"{op}: label_smoothing is not defined for loss_type={_show(types)}; got {eps}, must be 0 "
                         f"(it applies to {ref.SMOOTHED})")
    for t in smoothed:
        if t == "robust" and not 0 <= eps < 0.5:
            raise ValueError(f"{op}: label_smoothing must lie in [0, 0.5) for loss_type='robust', got {eps}")
        if t == "exo_pair" and not 0 < eps < 1:
            raise ValueError(f"{op}: label_smoothing must lie in (0, 1) for loss_type='exo_pair' (the EXO paper "
                             f"suggests 1e-3), got {eps}")
        if not 0 <= eps <= 1:
            raise ValueError(f"{op}: label_smoothing must lie in [0, 1] for loss_type={t!r}, got {eps}")
    plain = [t for t in smoothed if t in ("sigmoid", "sigmoid_norm")]
    if eps != 0 and plain and len(set(smoothed)) > len(set(plain)):
        # TRL 1.16's sigmoid ignores label_smoothing while robust / exo_pair / aot read it; here sigmoid reads it
        # too (cDPO), so one eps for both would train another objective than the same TRL config
        raise ValueError(f"{op}: label_smoothing={eps} would smooth {plain[0]!r} (cDPO) as well as "
                         f"{[t for t in smoothed if t not in plain]}; TRL's {plain[0]!r} ignores it. Combine them "
                         f"only with label_smoothing=0")
    if gamma != 0 and "simpo" not in types:
        raise ValueError(f"{op}: gamma (the SimPO target margin) only applies to loss_type='simpo', got {gamma}")
    if discopop_tau is None:
        tau = ref.DISCOPOP_TAU
    else:
        tau = number(op, "discopop_tau", discopop_tau)
        if "discopop" not in types:
            raise ValueError(f"{op}: discopop_tau only applies to loss_type='discopop', got {tau}")
        if tau <= 0:
            raise ValueError(f"{op}: discopop_tau must be > 0, got {tau}")
    need_ref = ref.needs_reference(types)
    if "simpo" in types and need_ref:
        raise ValueError(f"{op}: loss_type='simpo' is reference-free and cannot be combined with "
                         f"{[t for t in types if t not in ref.REFERENCE_FREE]}, which need a reference model")
    if "simpo" in types and has_reference:
        raise ValueError(
            f"{op}: loss_type={_show(types)} is reference-free; ref_chosen_logps and ref_rejected_logps must be None"
        )
    if need_ref and not has_reference:
        raise ValueError(f"{op}: ref_chosen_logps and ref_rejected_logps are required for loss_type={_show(types)}")
    return DPOOptions(types, weights, beta, eps, gamma, tau)


def _show(types: tuple[str, ...]) -> str:
    return repr(types[0]) if len(types) == 1 else repr(list(types))


def _check_vector(op: str, name: str, t, n: int | None, device, *, floating: bool = True) -> None:
    tensor(op, name, t)
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = f"({n},)" if n is not None else "(B,)"
        raise ValueError(f"{op}: {name} must have shape {want} (one value per pair), got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    discopop_tau: float | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalize: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss on per-sequence log-probs, mean over pairs, with TRL's logged stats.

    Equal to (``loss_type="sigmoid"``)::

        u = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
        loss = (-(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)).mean()

    and for a list of types, ``sum_k loss_weights[k] * loss_k`` (TRL's ``loss_type=[...]``, ``loss_weights=[...]``,
    e.g. MPO's ``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``).

    Loss types (formulas and papers: :mod:`fastalign.reference.preference`): every type of TRL 1.16's
    ``DPOTrainer`` (``sigmoid``, ``sigmoid_norm``, ``robust``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``,
    ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``) and
    the reference-free ``simpo`` (CPO/SimPO trainer's). ``sigmoid`` with ``label_smoothing`` > 0 is cDPO (TRL 1.16's
    ``sigmoid`` ignores it). ``sft`` is the NLL per chosen token of the batch: it needs the lengths to count tokens.
    ``simpo``: pass mean log-probs (``sequence_logprobs(..., average=True)``) or sums plus the lengths.

    Lengths: with ``chosen_lengths``/``rejected_lengths`` the types that normalise divide their log-probs by them:
    under ``length_normalize=None`` (TRL's rule) ``sigmoid_norm``, ``ipo`` and ``simpo``; ``True``: every type
    (``sigmoid`` + True is ``sigmoid_norm``); ``False``: none. Lengths that no listed type uses raise.

    Args:
        chosen_logps, rejected_logps: (B,) float policy log-probs of each pair's chosen / rejected response.
        ref_chosen_logps, ref_rejected_logps: (B,) float reference log-probs; required unless every type is
            reference-free (``simpo``, ``sft``); must be None with ``simpo``; optional with ``sft`` alone (then
            the logged rewards are beta (pi - ref), else beta pi).
        beta: > 0. loss_type: a name or a list of names. loss_weights: one number per type, or None (all 1).
        label_smoothing: eps for sigmoid, sigmoid_norm, robust (< 0.5), exo_pair (> 0), aot, aot_unpaired, simpo;
            must be 0 when no listed type reads it.
        gamma: SimPO's target margin (simpo only; TRL's ``simpo_gamma``).
        discopop_tau: DiscoPOP's tau (discopop only); None: 0.05.
        chosen_lengths, rejected_lengths: (B,) positive response lengths, or None.
        length_normalize: None, True or False (above).
    Returns:
        loss: () float; stats: detached () tensors ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies`` (a margin within rounding of 0 is a tie, not a win:
        :func:`fastalign.reference.preference.reward_accuracy`), ``logps/chosen``, ``logps/rejected``, and
        ``loss/<type>`` for each type of a combination.

    Raises:
        ValueError / TypeError naming the argument: mismatched shapes, beta <= 0, unknown loss_type, weights that
        do not match the types, an option no listed type uses (label_smoothing for hinge/ipo, gamma outside simpo,
        references for reference-free types, unused lengths), lengths missing for sft / sigmoid_norm.
    """
    op = "dpo_loss"
    has_ref = ref_chosen_logps is not None or ref_rejected_logps is not None
    opts = check_dpo_options(
        op, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, has_reference=has_ref,
        loss_weights=loss_weights, discopop_tau=discopop_tau,
    )
    _check_vector(op, "chosen_logps", chosen_logps, None, None)
    n, device = chosen_logps.shape[0], chosen_logps.device
    _check_vector(op, "rejected_logps", rejected_logps, n, device)
    if has_ref:  # needed by every type but simpo and sft; sft alone uses them for the logged rewards
        _check_vector(op, "ref_chosen_logps", ref_chosen_logps, n, device)
        _check_vector(op, "ref_rejected_logps", ref_rejected_logps, n, device)
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if lengths is not None:
            _check_vector(op, name, lengths, n, device, floating=False)
            if bool((lengths <= 0).any()):
                raise ValueError(f"{op}: {name} must be > 0 (a response with no token has no log-prob)")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"{op}: pass both chosen_lengths and rejected_lengths, or neither")
    check_lengths(op, opts.loss_type, length_normalize, chosen_lengths is not None)
    return ref.dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=opts.beta,
        loss_type=opts.loss_type, loss_weights=opts.loss_weights, label_smoothing=opts.label_smoothing,
        gamma=opts.gamma, discopop_tau=opts.discopop_tau, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, length_normalize=length_normalize,
    )


def check_lengths(op: str, types: tuple[str, ...], length_normalize, has_lengths: bool, *,
                  from_caller: bool = True) -> None:
    """Lengths must be given when a type needs them (sft counts tokens, sigmoid_norm and length_normalize=True
    divide by them) and, when the caller passed them (``from_caller``), must be used by some type."""
    if length_normalize is not None and not isinstance(length_normalize, bool):
        raise TypeError(f"{op}: length_normalize must be None, True or False, got {length_normalize!r}")
    if length_normalize is False and "sigmoid_norm" in types:
        raise ValueError(f"{op}: loss_type='sigmoid_norm' is length-normalised by definition; length_normalize=False "
                         f"contradicts it (use 'sigmoid')")
    needs = [t for t in types if t in ("sft", "sigmoid_norm")] or (list(types) if length_normalize else [])
    if needs and not has_lengths:
        raise ValueError(f"{op}: loss_type={needs[0]!r} needs chosen_lengths and rejected_lengths"
                         + (" (length_normalize=True)" if length_normalize and needs[0] not in ("sft", "sigmoid_norm")
                            else ""))
    if from_caller and has_lengths and not needs and not any(ref.normalizes(t, length_normalize) for t in types):
        raise ValueError(
            f"{op}: chosen_lengths/rejected_lengths are given but loss_type={_show(types)} does not use them "
            f"(length_normalize={length_normalize}); TRL's length-normalised DPO is loss_type='sigmoid_norm', or pass "
            f"length_normalize=True"
        )


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss with an optional margin, as TRL's RewardTrainer computes it.

    Equal to ``-F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()`` (+ ``center_rewards_coef *
    ((chosen_rewards + rejected_rewards) ** 2).mean()`` when set).

    Args:
        chosen_rewards, rejected_rewards: (B,) or (B, 1) float (a reward head's output).
        margin: None, a float, or (B,) float.
        center_rewards_coef: None or a float >= 0 (TRL's ``center_rewards_coefficient``).
    Returns:
        loss: () float; stats: detached () tensors ``accuracy``, ``margin``, ``rewards/chosen``, ``rewards/rejected``.
    """
    op = "reward_loss"
    for name, t in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if name == "chosen_rewards":
            chosen_rewards = t
        else:
            rejected_rewards = t
    _check_vector(op, "chosen_rewards", chosen_rewards, None, None)
    n, device = chosen_rewards.shape[0], chosen_rewards.device
    _check_vector(op, "rejected_rewards", rejected_rewards, n, device)
    if isinstance(margin, torch.Tensor) and margin.numel() != 1:
        _check_vector(op, "margin", margin, n, device)
    elif margin is not None:
        margin = number(op, "margin", margin)
    if center_rewards_coef is not None:
        center_rewards_coef = number(op, "center_rewards_coef", center_rewards_coef)
        if center_rewards_coef < 0:
            raise ValueError(f"{op}: center_rewards_coef must be >= 0, got {center_rewards_coef}")
    return ref.reward_loss(chosen_rewards, rejected_rewards, margin=margin, center_rewards_coef=center_rewards_coef)


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of token log-probs over each sequence's response tokens.

    Equal to ``(logprobs * mask).sum(-1)``, divided by ``mask.sum(-1).clamp(min=1)`` when ``average``; masked
    positions are dropped (not multiplied), so NaN/-inf padding there does not leak in.

    Args:
        logprobs: (B, T) float token log-probs (e.g. ``linear_logprobs(...).logprobs``).
        mask: (B, T) bool or 0/1 response mask.
        average: mean instead of sum (0 for a sequence with no response token).
    Returns:
        (B,) in the dtype of ``logprobs``; differentiable.
    """
    op = "sequence_logprobs"
    if not isinstance(logprobs, torch.Tensor) or not logprobs.dtype.is_floating_point:
        raise TypeError(f"{op}: logprobs must be a floating-point tensor")
    tensor(op, "mask", mask)
    if logprobs.dim() != 2:
        raise ValueError(f"{op}: logprobs must have shape (B, T), got {tuple(logprobs.shape)}")
    if mask.shape != logprobs.shape:
        raise ValueError(f"{op}: mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
    if mask.device != logprobs.device:
        raise ValueError(f"{op}: mask is on {mask.device} but logprobs on {logprobs.device}")
    return ref.sequence_logprobs(logprobs, mask, average=bool(average))
