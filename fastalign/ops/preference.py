"""Preference losses on per-sequence log-probs: the DPO family, the Bradley-Terry reward loss, sequence sums.

These are O(batch) element-wise computations: the public functions check their inputs (errors name the
argument) and run the PyTorch reference, which is already optimal here. The fused versions that start from
hidden states (``linear_dpo_loss``, ``linear_sequence_logprobs``) live in :mod:`fastalign.ops.linear_losses`.
"""
from __future__ import annotations


import torch

from fastalign.ops._checks import number, tensor
from fastalign.reference import preference as ref

LOSS_TYPES = ref.LOSS_TYPES


def check_dpo_options(
    op: str, *, beta, loss_type, label_smoothing, gamma, has_reference: bool
) -> tuple[float, float, float]:
    """Validate the DPO hyper-parameters; every option either takes effect or raises. Returns (beta, eps, gamma)."""
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"{op}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    beta = number(op, "beta", beta)
    if beta <= 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    eps = number(op, "label_smoothing", label_smoothing)
    gamma = number(op, "gamma", gamma)
    if loss_type == "robust" and not 0 <= eps < 0.5:
        raise ValueError(f"{op}: label_smoothing must lie in [0, 0.5) for loss_type='robust', got {eps}")
    if loss_type in ("sigmoid", "simpo") and not 0 <= eps <= 1:
        raise ValueError(f"{op}: label_smoothing must lie in [0, 1] for loss_type={loss_type!r}, got {eps}")
    if loss_type in ("hinge", "ipo") and eps != 0:
        raise ValueError(f"{op}: label_smoothing is not defined for loss_type={loss_type!r}; got {eps}, must be 0")
    if loss_type != "simpo" and gamma != 0:
        raise ValueError(f"{op}: gamma (the SimPO target margin) only applies to loss_type='simpo', got {gamma}")
    if loss_type == "simpo" and has_reference:
        raise ValueError(
            f"{op}: loss_type='simpo' is reference-free; ref_chosen_logps and ref_rejected_logps must be None"
        )
    if loss_type != "simpo" and not has_reference:
        raise ValueError(f"{op}: ref_chosen_logps and ref_rejected_logps are required for loss_type={loss_type!r}")
    return beta, eps, gamma


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
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss on per-sequence log-probs, mean over pairs, with TRL's logged stats.

    Equal to (``loss_type="sigmoid"``)::

        u = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
        loss = (-(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)).mean()

    Notation: pi/ref = policy/reference sequence log-probs, L = response length, d = the difference of the
    (optionally length-normalised) log-ratios, u = beta * d, eps = label_smoothing.

    - ``sigmoid``: -(1-eps) log sig(u) - eps log sig(-u) (DPO; cDPO with eps > 0).
    - ``robust``: (-(1-eps) log sig(u) + eps log sig(-u)) / (1 - 2 eps) (rDPO), 0 <= eps < 0.5.
    - ``hinge``: relu(1 - u) (SLiC). ``ipo``: (d - 1/(2 beta))^2 (IPO).
    - ``simpo``: reference-free, -(1-eps) log sig(u') - eps log sig(-u') with
      u' = beta (pi_c / L_c - pi_r / L_r) - gamma. Pass mean log-probs (``sequence_logprobs(..., average=True)``)
      or sums plus the lengths.

    With ``chosen_lengths``/``rejected_lengths`` the log-ratios are divided by the lengths: TRL's ``ipo`` does so
    always, and TRL's ``sigmoid_norm`` is ``sigmoid`` with lengths.

    Args:
        chosen_logps, rejected_logps: (B,) float policy log-probs of each pair's chosen / rejected response.
        ref_chosen_logps, ref_rejected_logps: (B,) float reference log-probs; must be None for ``simpo`` only.
        beta: > 0. loss_type: sigmoid | robust | hinge | ipo | simpo.
        label_smoothing: eps for sigmoid / robust / simpo; must be 0 for hinge and ipo.
        gamma: SimPO's target margin (simpo only; TRL's ``simpo_gamma``).
        chosen_lengths, rejected_lengths: (B,) positive response lengths, or None.
    Returns:
        loss: () float; stats: detached () tensors ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.

    Raises:
        ValueError / TypeError naming the argument: mismatched shapes, beta <= 0, unknown loss_type, an option
        the loss type does not use (label_smoothing for hinge/ipo, gamma outside simpo, references for simpo).
    """
    op = "dpo_loss"
    has_ref = ref_chosen_logps is not None or ref_rejected_logps is not None
    beta, eps, gamma = check_dpo_options(
        op, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, has_reference=has_ref
    )
    _check_vector(op, "chosen_logps", chosen_logps, None, None)
    n, device = chosen_logps.shape[0], chosen_logps.device
    _check_vector(op, "rejected_logps", rejected_logps, n, device)
    if loss_type != "simpo":
        _check_vector(op, "ref_chosen_logps", ref_chosen_logps, n, device)
        _check_vector(op, "ref_rejected_logps", ref_rejected_logps, n, device)
    for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if lengths is not None:
            _check_vector(op, name, lengths, n, device, floating=False)
            if bool((lengths <= 0).any()):
                raise ValueError(f"{op}: {name} must be > 0 (a response with no token has no log-prob)")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"{op}: pass both chosen_lengths and rejected_lengths, or neither")
    return ref.dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
        label_smoothing=eps, gamma=gamma, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
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
