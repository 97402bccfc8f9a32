"""Pure-PyTorch RL ops: GAE, GRPO-family advantages, PPO policy / value losses, KL penalties.

The spec every kernel (Triton, C++, CUDA) is tested against, and the CPU path when the extension is not built.
Everything is computed in fp32 (fp64 when an input is fp64) and is differentiable by autograd.

Notation (one batch row b, time step t; shapes (B, T)):
    r_t rewards, V_t values, m_t mask (nonzero = response token), A_t advantages
    gamma discount, lam GAE lambda; eps_low / eps_high clip ranges; c the dual-clip constant (> 1)
    pi_t = logprobs, old_t = old_logprobs, ref_t = ref_logprobs; ratio rho_t = exp(pi_t - old_t)

Aggregation (``agg``) of a per-token loss l_t over valid tokens, n_b = sum_t m_bt, N = sum_b n_b, L = norm_len
(defaults to T):
    token-mean               sum_bt m l / max(N, 1)                        (verl; TRL "bnpo"/"dapo")
    seq-mean-token-sum       1/B sum_b sum_t m l                            (verl)
    seq-mean-token-mean      1/B sum_b (sum_t m l / max(n_b, 1))            (TRL "grpo"; verl)
    seq-mean-token-sum-norm  1/(B L) sum_bt m l                             (Dr. GRPO; TRL "dr_grpo"; current
                                                                             verl; verl's early agg_loss divided
                                                                             by L only, without the 1/B)
All four are a weighted sum sum_bt w_bt l_bt with w_bt = m_bt * scale_b; rows without valid tokens contribute 0
and still count in B (as TRL does), so an all-masked batch gives a zero loss and zero gradients.
"""
from __future__ import annotations

import torch

from fastalign.reference._common import compute_dtype

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GROUP_SCALES = ("group", "none", "rloo", "batch")
KL_KINDS = ("k1", "k2", "k3")
POLICY_STATS = (
    "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_min",
    "ratio_max",
)
VALUE_STATS = ("clip_frac", "values_mean")


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask != 0


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``valid`` (bool) positions; 0 when none is valid (verl's masked_mean without the NaN)."""
    return torch.where(valid, x, 0).sum() / valid.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the masked mean and the unbiased masked variance, applied to every
    element (valid or not), as verl's ``masked_whiten(values, mask, shift_mean=True)``. Fewer than 2 valid
    elements: the variance is taken as 0 (verl would divide by zero)."""
    n = valid.sum()
    mean = masked_mean(x, valid)
    sq = torch.where(valid, (x - mean) ** 2, 0).sum()
    var = torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.zeros_like(sq))
    return (x - mean) * torch.rsqrt(var + eps)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), verl's ``compute_gae_advantage_return``.

    Equal to the reverse loop (nv = next value, starting at 0; A starting at 0)::

        for t in reversed(range(T)):
            delta = r[:, t] + gamma * nv - V[:, t]
            a_new = delta + gamma * lam * A
            nv = where(m[:, t], V[:, t], nv)          # masked positions carry the next value ...
            A = where(m[:, t], a_new, A)              # ... and the running advantage unchanged
            adv[:, t] = A
        returns = adv + V                             # before whitening, at every position
        adv = masked_whiten(adv, m) if whiten         # batch-level masked mean / unbiased std

    Args:
        rewards: (B, T) float token-level rewards.
        values: (B, T) float value estimates.
        mask: (B, T) bool or 0/1 numeric, nonzero = response token; None = all valid.
        gamma, lam: in [0, 1].
        whiten: whiten the advantages over all valid tokens of the batch (verl does by default).
    Returns:
        advantages (B, T), returns (B, T): fp32 (fp64 for fp64 inputs).
    """
    dtype = compute_dtype(rewards, values)
    r, v = rewards.to(dtype), values.to(dtype)
    valid = _valid(mask, r)
    nv = torch.zeros_like(r[:, 0]) if r.shape[1] else r.new_zeros(r.shape[0])
    adv_t = torch.zeros_like(nv)
    out = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nv - v[:, t]
        a_new = delta + gamma * lam * adv_t
        nv = torch.where(valid[:, t], v[:, t], nv)
        adv_t = torch.where(valid[:, t], a_new, adv_t)
        out.append(adv_t)
    adv = torch.stack(out[::-1], dim=1) if out else torch.zeros_like(r)
    returns = adv + v
    if whiten:
        adv = masked_whiten(adv, valid)
    return adv, returns


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Outcome advantages of GRPO and its relatives; rows b = g * G + i are the G completions of prompt g.

    Equal to (mean_g / std_g over each group of G; std unbiased, as TRL and verl)::

        "group": (r - mean_g) / (std_g + eps)          GRPO: verl compute_grpo_outcome_advantage,
                                                       TRL GRPOTrainer scale_rewards="group" (eps 1e-4 there)
        "none":  r - mean_g                             Dr. GRPO: verl norm_adv_by_std_in_grpo=False,
                                                       TRL scale_rewards="none"
        "batch": (r - mean_g) / (std(r over B) + eps)   TRL scale_rewards="batch"
        "rloo":  r - (sum_g - r) / (G - 1)              RLOO leave-one-out baseline: verl
                                                       compute_rloo_outcome_advantage, TRL RLOOTrainer

    G = 1 gives zeros for every scale (TRL: no baseline, std taken as 0).

    Args:
        rewards: (B,) float sequence rewards, B a multiple of ``group_size``.
    Returns:
        advantages: (B,) fp32 (fp64 for fp64 rewards).
    """
    r = rewards.to(compute_dtype(rewards))
    if group_size == 1:
        return torch.zeros_like(r)
    grouped = r.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if scale == "rloo":
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        return (grouped - baseline).reshape(-1)
    centered = grouped - mean
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        return (centered / (grouped.std(dim=1, keepdim=True) + eps)).reshape(-1)
    if scale == "batch":
        return (centered / (r.std() + eps)).reshape(-1)
    raise ValueError(f"group_advantages: scale must be one of {GROUP_SCALES}, got {scale!r}")


def aggregate(
    per_token: torch.Tensor, valid: torch.Tensor, agg: str = "token-mean", norm_len: int | None = None
) -> torch.Tensor:
    """verl's ``agg_loss`` (see the module docstring); masked entries of ``per_token`` may hold anything."""
    loss = torch.where(valid, per_token, 0)
    batch, length = per_token.shape
    if agg == "token-mean":
        return loss.sum() / valid.sum().clamp(min=1)
    if agg == "seq-mean-token-sum":
        return loss.sum(-1).sum() / batch
    if agg == "seq-mean-token-mean":
        return (loss.sum(-1) / valid.sum(-1).clamp(min=1)).sum() / batch
    if agg == "seq-mean-token-sum-norm":
        return loss.sum() / (batch * (length if norm_len is None else norm_len))
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with asymmetric ("clip-higher", DAPO) and dual clip: verl ``compute_policy_loss``
    (vanilla) followed by ``agg_loss``; TRL GRPOTrainer's loss types grpo/bnpo/dr_grpo/dapo for the same inputs.

    Per valid token::

        rho = exp(pi - old)
        l = max(-A * rho, -A * clamp(rho, 1 - eps_low, 1 + eps_high))      eps_high = clip_high or clip_low
        l = min(l, -A * c)  where A < 0                                    only with dual_clip = c > 1
        loss = aggregate(l, m, agg)

    Stats (detached, means over valid tokens, 0 when there are none; verl's names in brackets):
        clip_frac (pg_clipfrac) = clip_frac_low + clip_frac_high, where clip_frac_high = mean(A > 0 and
        rho > 1 + eps_high), clip_frac_low = mean(A < 0 and rho < 1 - eps_low) (TRL's clip_ratio/low|high);
        dual_clip_frac (pg_clipfrac_lower); approx_kl = mean(old - pi) (ppo_kl); ratio mean / min / max.

    Args:
        logprobs: (B, T) float, differentiable. old_logprobs: (B, T). advantages: (B, T), or (B,) broadcast
            over T (GRPO). mask: (B, T) bool or 0/1, nonzero = valid; None = all valid.
    Returns:
        loss: () fp32 (fp64 for fp64 inputs); stats: dict of () detached tensors, keys ``POLICY_STATS``.
    """
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    valid = _valid(mask, logprobs)
    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand(logprobs.shape)
    # sanitize masked positions first so that garbage there (inf, NaN) cannot reach the loss or the gradient
    log_ratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.to(dtype), 0)
    adv = torch.where(valid, adv, 0)
    ratio = torch.exp(log_ratio)
    eps_high = clip_low if clip_high is None else clip_high
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + eps_high)
    per_token = torch.maximum(loss1, loss2)
    dual_hit = torch.zeros_like(valid)
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        dual_hit = (adv < 0) & (per_token > loss3) & valid
        per_token = torch.where(adv < 0, torch.minimum(per_token, loss3), per_token)
    loss = aggregate(per_token, valid, agg, norm_len)
    with torch.no_grad():
        ratio_d = ratio.detach()
        high = ((adv > 0) & (ratio_d > 1 + eps_high) & valid).to(dtype)
        low = ((adv < 0) & (ratio_d < 1 - clip_low) & valid).to(dtype)
        any_valid = valid.any()
        stats = {
            "clip_frac": masked_mean(high + low, valid),
            "clip_frac_low": masked_mean(low, valid),
            "clip_frac_high": masked_mean(high, valid),
            "dual_clip_frac": masked_mean(dual_hit.to(dtype), valid),
            "approx_kl": masked_mean(-log_ratio.detach(), valid),
            "ratio_mean": masked_mean(ratio_d, valid),
            "ratio_min": torch.where(any_valid, torch.where(valid, ratio_d, float("inf")).min(), 0),
            "ratio_max": torch.where(any_valid, torch.where(valid, ratio_d, float("-inf")).max(), 0),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: verl ``compute_value_loss``; TRL PPOTrainer's vf_loss (token-mean).

    Per valid token::

        l = 0.5 * (V - R)^2                                                clip = None
        l = 0.5 * max((V - R)^2, (old + clamp(V - old, -clip, clip) - R)^2)
        loss = aggregate(l, m, agg)

    Stats: clip_frac = mean((clipped error) > (unclipped error)) (verl vf_clipfrac), values_mean.

    Args:
        values: (B, T) float, differentiable. old_values, returns: (B, T). mask: (B, T) or None.
    Returns:
        loss: () fp32 (fp64 for fp64 inputs); stats: dict of () detached tensors, keys ``VALUE_STATS``.
    """
    dtype = compute_dtype(values, old_values, returns)
    valid = _valid(mask, values)
    v = torch.where(valid, values.to(dtype), 0)
    old = torch.where(valid, old_values.to(dtype), 0)
    ret = torch.where(valid, returns.to(dtype), 0)
    err1 = (v - ret) ** 2
    if clip is None:
        per_token = 0.5 * err1
        clipped = torch.zeros_like(valid)
    else:
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        err2 = (v_clipped - ret) ** 2
        per_token = 0.5 * torch.maximum(err1, err2)
        clipped = (err2 > err1) & valid
    loss = aggregate(per_token, valid, agg, norm_len)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(clipped.to(dtype), valid), "values_mean": masked_mean(v.detach(), valid)}
    return loss, stats


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    kind: str = "k3",
    mask: torch.Tensor | None = None,
    agg: str | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Per-token KL estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence"):
    verl ``kl_penalty`` ("kl"/"k1", "mse"/"k2", "low_var_kl"/"k3" without verl's clamp to [-10, 10]); TRL
    GRPOTrainer's per_token_kl is k3.

    With d = ref - pi::

        k1 = -d            k2 = d^2 / 2            k3 = exp(d) - d - 1

    With ``agg`` (one of AGG_MODES), the per-token KL aggregated over ``mask`` by :func:`aggregate`.

    Args:
        logprobs, ref_logprobs: (...) float, same shape ((B, T) with ``agg``).
        mask: (B, T) nonzero = valid, None = all valid (with ``agg``).
    Returns:
        (...) fp32 (fp64 for fp64 inputs); with ``agg`` the () loss.
    """
    if agg is not None:
        per_token = kl_penalty(logprobs, ref_logprobs, kind=kind)
        return aggregate(per_token, _valid(mask, per_token), agg, norm_len)
    dtype = compute_dtype(logprobs, ref_logprobs)
    d = ref_logprobs.to(dtype) - logprobs.to(dtype)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"kl_penalty: kind must be one of {KL_KINDS}, got {kind!r}")
