"""RL ops over (B, T) token grids: GAE, GRPO-family advantages, PPO policy / value losses, KL penalties.

Backends (see :mod:`fastalign._backend`): ``torch`` is :mod:`fastalign.reference.rl`; ``triton`` runs
:mod:`fastalign.kernels.rl`; ``cpp`` / ``cuda`` run the optional compiled extension ``fastalign._C`` (GAE and the
PPO policy loss). Under ``auto``, CPU tensors use the C++ extension for ``gae`` / ``ppo_policy_loss`` when it is
built (one warning when it is not), CUDA tensors use Triton.

The losses are computed forward and backward in one pass: the forward kernel writes the unscaled per-token
derivative, a one-program kernel reduces the row partials to the loss, the stats and a per-row weight, and the
backward is a single scaled copy. Gradients flow to ``logprobs`` (``values`` for the value loss) only:
``old_logprobs``, ``advantages``, ``old_values`` and ``returns`` are constants of the update, as in TRL and verl,
and passing them with ``requires_grad`` raises on every backend.
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from fastalign import _backend
from fastalign.ops._checks import agg_mode, float_tensor, in_unit, number, positive, positive_int, ppo_clips, tensor
from fastalign.reference import rl as ref
from fastalign.reference._common import compute_dtype

# the kernels' and the extension's number for each aggregation mode (kernels/rl.py AGG_*)
_AGG_INDEX = {name: i for i, name in enumerate(ref.AGG_MODES)}
_EXT_OPS = ("torch", "triton", "cpp", "cuda")


# ---------------------------------------------------------------------------------------------------- validation

def _check_grid(op: str, mask, **tensors) -> tuple[int, int]:
    """All ``tensors`` (B, T) float on one device; ``mask`` None or (B, T) bool / numeric. Returns (B, T)."""
    (first_name, first), *_ = tensors.items()
    for name, t in tensors.items():
        float_tensor(op, name, t)
    if first.dim() != 2 or first.shape[0] == 0 or first.shape[1] == 0:
        raise ValueError(f"{op}: {first_name} must have shape (B, T) with B, T > 0, got {tuple(first.shape)}")
    for name, t in tensors.items():
        if t.shape != first.shape:
            raise ValueError(f"{op}: {name} must have shape {tuple(first.shape)} (like {first_name}), got "
                             f"{tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
    tensor(op, "mask", mask, allow_none=True)
    if mask is not None:
        if mask.dtype.is_complex:
            raise TypeError(f"{op}: mask must be bool or real numeric (nonzero = valid), got {mask.dtype}")
        if mask.shape != first.shape:
            raise ValueError(f"{op}: mask must have shape {tuple(first.shape)} (like {first_name}), got "
                             f"{tuple(mask.shape)}")
        if mask.device != first.device:
            raise ValueError(f"{op}: mask is on {mask.device} but {first_name} is on {first.device}")
    return first.shape[0], first.shape[1]


# ------------------------------------------------------------------------------------------------ dispatch

_warned_fallback = False


def _resolve(op: str, backend: str, tensors, *, supports, dtype: torch.dtype) -> str:
    device = next(t.device for t in tensors if t is not None)
    use_ext = device.type == "cpu" and "cpp" in supports
    name = _backend.resolve(backend, tensors, op=op, supports=supports, prefer_extension=use_ext)
    requested = backend if backend != "auto" else os.environ.get("FASTALIGN_BACKEND", "auto").strip().lower()
    if name == "triton" and dtype == torch.float64:
        if requested in ("auto", ""):
            return "torch"
        raise TypeError(f"{op}: backend='triton' computes in fp32 and supports fp16/bf16/fp32 inputs, got fp64; "
                        "use backend='torch' or 'cpp' for fp64")
    if use_ext and name == "torch" and requested in ("auto", ""):
        _warn_fallback(op)
    return name


def _warn_fallback(op: str) -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    import warnings

    why = _backend.extension_status()[1]
    warnings.warn(
        f"fastalign: {op} and the other CPU RL ops fall back to the PyTorch path: the C++ extension is unavailable "
        f"({why}). Build it once with `python -m fastalign.ext build`, or set FASTALIGN_BUILD_EXT=1 to build it on "
        "first use.",
        RuntimeWarning,
        stacklevel=4,
    )


def _extension():
    from fastalign import _ext

    return _ext.load(build=False)


def _kernels():
    from fastalign.kernels import rl as kernels  # imported on first use: after TRITON_INTERPRET is set

    return kernels


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The extension takes contiguous bool masks."""
    return None if mask is None else (mask if mask.dtype == torch.bool else mask != 0).contiguous()


# ---------------------------------------------------------------------------------------------------------- GAE

def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation with verl's handling of masked positions, as one reverse scan over T.

    Equal to (verl ``compute_gae_advantage_return``; see :func:`fastalign.reference.rl.gae`)::

        nv, A = 0, 0
        for t in reversed(range(T)):
            a_new = r[:, t] + gamma * nv - V[:, t] + gamma * lam * A
            nv = where(mask[:, t], V[:, t], nv); A = where(mask[:, t], a_new, A); adv[:, t] = A
        returns = adv + V
        if whiten: adv = (adv - masked_mean) / sqrt(masked_var_unbiased + 1e-8)

    Masked (non-response) positions carry the running advantage and the next value through unchanged.

    Args:
        rewards: (B, T) fp16/bf16/fp32/fp64 token-level rewards (e.g. the score on the last token, minus KL).
        values: (B, T) same shape, value estimates.
        mask: (B, T) bool or 0/1 numeric, nonzero = response token; None = all valid.
        gamma, lam: discount and GAE lambda, in [0, 1].
        whiten: whiten the advantages with the batch's masked mean and unbiased std.
        backend: "auto" | "torch" | "triton" | "cpp" | "cuda". The kernel backends do not propagate
            gradients (GAE targets are constants of the update): with inputs that require grad, "auto" runs the
            differentiable reference and an explicit kernel backend raises.

    Returns:
        advantages (B, T), returns (B, T): fp32 (fp64 for fp64 inputs on the torch / cpp backends).
    """
    op = "gae"
    _check_grid(op, mask, rewards=rewards, values=values)
    gamma = in_unit(op, "gamma", gamma)
    lam = in_unit(op, "lam", lam)
    dtype = compute_dtype(rewards, values)
    needs_grad = torch.is_grad_enabled() and (rewards.requires_grad or values.requires_grad)
    if needs_grad and backend == "auto":
        name = "torch"  # the kernels return constants; the reference is differentiable
    else:
        name = _resolve(op, backend, (rewards, values, mask), supports=_EXT_OPS, dtype=dtype)
    if name != "torch" and needs_grad:
        raise RuntimeError(f"gae: backend={name!r} does not propagate gradients; detach rewards and values or use "
                           "backend='torch'")
    if name == "torch":
        return ref.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    if name == "triton":
        return _kernels().gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=bool(whiten))
    common = torch.promote_types(rewards.dtype, values.dtype)
    adv, returns = _extension().gae(rewards.to(common).contiguous(), values.to(common).contiguous(),
                                    _bool_mask(mask), gamma, lam)
    if whiten:
        valid = torch.ones_like(adv, dtype=torch.bool) if mask is None else mask != 0
        adv = ref.masked_whiten(adv, valid)
    return adv, returns


# -------------------------------------------------------------------------------------------- group advantages

def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """Outcome advantages of GRPO (``scale="group"``), Dr. GRPO (``"none"``), RLOO (``"rloo"``) and batch-scaled
    GRPO (``"batch"``); rows ``g * G .. g * G + G - 1`` are the completions of prompt g.

    Equal to ``(r - r.view(-1, G).mean(1, keepdim=True)) / (r.view(-1, G).std(1, keepdim=True) + eps)`` for
    "group" (unbiased std, as TRL and verl); see :func:`fastalign.reference.rl.group_advantages` for all four.
    A few [B]-sized ops: this runs on the torch backend on every device.

    Args:
        rewards: (B,) float sequence rewards; B a multiple of ``group_size``.
        group_size: G >= 1 completions per prompt (G = 1 gives zeros).
        scale: "group" | "none" | "rloo" | "batch".
        eps: >= 0, added to the std.
    Returns:
        advantages: (B,) fp32 (fp64 for fp64 rewards).
    """
    op = "group_advantages"
    float_tensor(op, "rewards", rewards)
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"{op}: rewards must have shape (B,) with B > 0, got {tuple(rewards.shape)}")
    positive_int(op, "group_size", group_size)
    if rewards.numel() % group_size:
        raise ValueError(f"{op}: the batch size B={rewards.numel()} must be a multiple of group_size={group_size}")
    if scale not in ref.GROUP_SCALES:
        raise ValueError(f"{op}: scale must be one of {ref.GROUP_SCALES}, got {scale!r}")
    eps = number(op, "eps", eps)
    if eps < 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    _backend.resolve(backend, (rewards,), op=op, supports=("torch",))
    return ref.group_advantages(rewards, group_size, scale=scale, eps=eps)


# ------------------------------------------------------------------------------------- policy and value losses

def _loss_forward(backend, current, old, target, mask, **cfg):
    """(loss, stats, unscaled per-token grad or None, per-row scale) of the policy or the value loss."""
    if backend == "triton":
        return _kernels().rl_loss_forward(current, old, target, mask, **cfg)
    # cpp / cuda: the extension implements the policy loss only, on one dtype
    common = torch.promote_types(torch.promote_types(current.dtype, old.dtype), target.dtype)
    loss, stats, grad, scale = _extension().ppo_policy_loss_fwd(
        current.to(common).contiguous(), old.to(common).contiguous(), target.to(common).contiguous(),
        _bool_mask(mask), cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"] if cfg["dual_clip"] is not None else 0.0,
        cfg["agg"], cfg["norm_len"], cfg["need_grad"],
    )
    return loss, stats, (grad if cfg["need_grad"] else None), scale


def _loss_backward(backend, grad, scale, upstream, dtype):
    upstream = upstream.float().reshape(1).contiguous()
    if backend == "triton":
        return _kernels().rl_loss_backward(grad, scale, upstream, dtype)
    return _extension().ppo_policy_loss_bwd(grad, scale, upstream).to(dtype)


class _RLLossFunction(torch.autograd.Function):
    """Loss and stats in the forward; the forward's per-token derivative times w_b * upstream in the backward."""

    @staticmethod
    def forward(ctx, current, old, target, mask, backend: str, cfg: dict):
        loss, stats, grad, scale = _loss_forward(backend, current, old, target, mask, need_grad=True, **cfg)
        ctx.backend = backend
        ctx.current_dtype = current.dtype
        ctx.save_for_backward(grad, scale)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        grad, scale = ctx.saved_tensors
        return _loss_backward(ctx.backend, grad, scale, grad_loss, ctx.current_dtype), None, None, None, None, None


def _check_constants(op: str, **tensors) -> None:
    """The update's constants must not carry gradients: every backend would drop them (raise, do not train a
    different objective)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but it is a constant of the update (no gradient flows to "
                             f"it); pass {name}.detach()")


def _run_loss(backend, current, old, target, mask, cfg):
    if torch.is_grad_enabled() and current.requires_grad:
        return _RLLossFunction.apply(current, old, target, mask, backend, cfg)
    loss, stats, _, _ = _loss_forward(backend, current.detach(), old, target, mask, need_grad=False, **cfg)
    return loss, stats


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
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with clip-higher and dual clip, aggregated like verl's ``agg_loss``; forward and
    backward fused, stats from the same pass.

    Equal to (see :func:`fastalign.reference.rl.ppo_policy_loss`)::

        ratio = torch.exp(logprobs - old_logprobs)
        l = torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip_low, 1 + (clip_high or clip_low)))
        if dual_clip: l = torch.where(A < 0, torch.minimum(l, -A * dual_clip), l)
        loss = (l * mask).sum() / mask.sum().clamp(min=1)                      # agg="token-mean"

    Notation: A advantages; agg in "token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean" (TRL "grpo") |
    "seq-mean-token-sum-norm" (Dr. GRPO: sum / (B * norm_len), norm_len defaults to T).

    Args:
        logprobs: (B, T) fp16/bf16/fp32 (fp64 on torch / cpp), the current policy's token log-probs.
        old_logprobs: (B, T) log-probs at sampling time (a constant: requires_grad raises).
        advantages: (B, T), or (B,) / (B, 1) per sequence (GRPO), a constant.
        mask: (B, T) bool or 0/1, nonzero = response token; None = all valid.
        clip_low, clip_high: > 0; the ratio is clipped to [1 - clip_low, 1 + clip_high] (clip_high defaults to
            clip_low). dual_clip: None or c > 1 (Ye et al. 2020), bounds the loss of A < 0 tokens by -A c.
        norm_len: the constant length of "seq-mean-token-sum-norm" (e.g. the max completion length).
        backend: "auto" | "torch" | "triton" | "cpp" | "cuda".

    Returns:
        loss: () fp32 (fp64 for fp64 inputs on torch / cpp); stats: dict of detached () tensors, means over valid
        tokens (0 when none): clip_frac, clip_frac_low, clip_frac_high, dual_clip_frac, approx_kl (mean of
        old - new), ratio_mean, ratio_min, ratio_max. An all-masked batch gives 0 loss and 0 gradients.
    """
    op = "ppo_policy_loss"
    batch, length = _check_grid(op, mask, logprobs=logprobs, old_logprobs=old_logprobs)
    float_tensor(op, "advantages", advantages)
    if advantages.shape == (batch, 1) and length != 1:  # per-sequence advantages as TRL keeps them
        advantages = advantages[:, 0]
    if advantages.shape not in (logprobs.shape, (batch,)):
        raise ValueError(f"{op}: advantages must have shape {tuple(logprobs.shape)}, ({batch},) or ({batch}, 1), got "
                         f"{tuple(advantages.shape)}")
    if advantages.device != logprobs.device:
        raise ValueError(f"{op}: advantages is on {advantages.device} but logprobs is on {logprobs.device}")
    clip_low, clip_high, dual_clip = ppo_clips(op, clip_low, clip_high, dual_clip)
    norm = agg_mode(op, agg, norm_len, length)
    _check_constants(op, old_logprobs=old_logprobs, advantages=advantages)
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    name = _resolve(op, backend, (logprobs, old_logprobs, advantages, mask), supports=_EXT_OPS, dtype=dtype)
    if name == "torch":
        return ref.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                   dual_clip=dual_clip, agg=agg, norm_len=norm_len)
    cfg = dict(is_value=False, clip_low=clip_low, clip_high=clip_low if clip_high is None else clip_high,
               dual_clip=dual_clip, agg=_AGG_INDEX[agg], norm_len=norm)
    if name != "triton":
        del cfg["is_value"]
    loss, stats = _run_loss(name, logprobs, old_logprobs, advantages, mask, cfg)
    return loss, dict(zip(ref.POLICY_STATS, stats.unbind()))


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    norm_len: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (verl ``compute_value_loss``; TRL PPOTrainer's vf_loss), forward and backward fused.

    Equal to (see :func:`fastalign.reference.rl.value_loss`)::

        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        l = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)   # 0.5 (V - R)^2 if no clip
        loss = (l * mask).sum() / mask.sum().clamp(min=1)                             # agg="token-mean"

    Args:
        values: (B, T) fp16/bf16/fp32 (fp64 on torch), the critic's current predictions.
        old_values: (B, T) predictions at rollout time; returns: (B, T) targets (constants: requires_grad raises).
        mask: (B, T) bool or 0/1 or None. clip: None or > 0. agg, norm_len: as :func:`ppo_policy_loss`.
        backend: "auto" | "torch" | "triton".

    Returns:
        loss: () fp32; stats: dict of detached () tensors: clip_frac, values_mean (over valid tokens).
    """
    op = "value_loss"
    _, length = _check_grid(op, mask, values=values, old_values=old_values, returns=returns)
    clip = positive(op, "clip", clip, allow_none=True)
    norm = agg_mode(op, agg, norm_len, length)
    _check_constants(op, old_values=old_values, returns=returns)
    dtype = compute_dtype(values, old_values, returns)
    name = _resolve(op, backend, (values, old_values, returns, mask), supports=("torch", "triton"), dtype=dtype)
    if name == "torch":
        return ref.value_loss(values, old_values, returns, mask, clip=clip, agg=agg, norm_len=norm_len)
    cfg = dict(is_value=True, clip_low=clip, clip_high=None, dual_clip=None, agg=_AGG_INDEX[agg], norm_len=norm)
    loss, stats = _run_loss(name, values, old_values, returns, mask, cfg)
    return loss, dict(zip(ref.VALUE_STATS, stats.unbind()))


# ------------------------------------------------------------------------------------------------- KL penalty

class _KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, kind: str):
        logp, ref_lp = logprobs.contiguous(), ref_logprobs.contiguous()
        ctx.kind = kind
        ctx.save_for_backward(logp, ref_lp)
        return _kernels().kl_forward(logp, ref_lp, kind=kind)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logp, ref_lp = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # incoming gradients may be expanded or strided views
        grad_logp, grad_ref = _kernels().kl_backward(
            logp, ref_lp, grad_out, kind=ctx.kind, need_logp=ctx.needs_input_grad[0], need_ref=ctx.needs_input_grad[1],
        )
        return grad_logp, grad_ref, None


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str = "k3", backend: str = "auto"
) -> torch.Tensor:
    """Per-token KL(pi || ref) estimators from samples of pi, with gradients to both inputs.

    Equal to, with ``d = ref_logprobs - logprobs``: ``-d`` (k1), ``d ** 2 / 2`` (k2),
    ``torch.expm1(d) - d`` (k3, TRL GRPO's per_token_kl; verl "low_var_kl" without its clamp).

    Args:
        logprobs, ref_logprobs: (...) fp16/bf16/fp32 (fp64 on torch), same shape and device.
        kind: "k1" | "k2" | "k3". backend: "auto" | "torch" | "triton".
    Returns:
        (...) fp32 (fp64 for fp64 inputs on torch).
    """
    op = "kl_penalty"
    float_tensor(op, "logprobs", logprobs)
    float_tensor(op, "ref_logprobs", ref_logprobs)
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"{op}: ref_logprobs must have shape {tuple(logprobs.shape)} (like logprobs), got "
                         f"{tuple(ref_logprobs.shape)}")
    if ref_logprobs.device != logprobs.device:
        raise ValueError(f"{op}: ref_logprobs is on {ref_logprobs.device} but logprobs is on {logprobs.device}")
    if kind not in ref.KL_KINDS:
        raise ValueError(f"{op}: kind must be one of {ref.KL_KINDS}, got {kind!r}")
    dtype = compute_dtype(logprobs, ref_logprobs)
    name = _resolve(op, backend, (logprobs, ref_logprobs), supports=("torch", "triton"), dtype=dtype)
    if name == "torch" or logprobs.numel() == 0:
        return ref.kl_penalty(logprobs, ref_logprobs, kind=kind)
    return _KLFunction.apply(logprobs, ref_logprobs, kind)
