"""RL ops over (B, T) token grids: GAE, GRPO-family advantages, PPO policy / value losses, KL penalties.

Backends (see :mod:`fastalign._backend`): ``torch`` runs GAE and the group advantages as
:mod:`fastalign.reference.rl`, and the policy / value losses and the KL penalty in the closed form below (plain
torch ops, any device); ``triton`` runs :mod:`fastalign.kernels.rl`; ``cpp`` runs the optional compiled extension
``fastalign._C`` on CPU tensors (GAE, the policy and value losses, the KL penalty), ``cuda`` on CUDA tensors (GAE
and the policy loss). Under ``auto``, CPU tensors use the C++ extension when it is built and the closed-form torch
path when it is not (one warning), CUDA tensors use Triton (the CUDA extension for GAE / the policy loss when
built).

The losses are computed forward and backward in one pass: the forward computes the loss, the stats and the
unscaled per-token derivative of the loss together (the closed form), reduced with a per-row weight w_b, and the
backward only scales that derivative by w_b and the upstream gradient. Gradients flow to ``logprobs`` (``values``
for the value loss) only:
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
_CPU_EXT_OPS = ("torch", "triton", "cpp")  # the value loss and the KL penalty: C++ on CPU, Triton on CUDA
_KL_INDEX = {name: i for i, name in enumerate(ref.KL_KINDS)}


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
    """The extension's GAE (and the CUDA kernels) take contiguous bool masks."""
    return None if mask is None else (mask if mask.dtype == torch.bool else mask != 0).contiguous()


def _loss_mask(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The extension's CPU losses read bool, fp32 and int64 masks in place (converting a float mask to bool costs
    a pass over (B, T)); other dtypes, and CUDA, get a bool mask."""
    if mask is None:
        return None
    if device.type == "cpu" and mask.dtype in (torch.bool, torch.float32, torch.int64):
        return mask.contiguous()
    return _bool_mask(mask)


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


# ------------------------------------------------------------------------------- the closed-form torch path
# The losses as a few whole-tensor torch ops with the derivative written out, no autograd graph. Masked positions
# are set to +0.0 with one bitwise AND on the float bits (NaN / inf at valid positions kept): torch.where and
# masked_fill are scalar loops on CPU, about 30x an add (1 ms at 256 x 1024 on one core), and the reference's
# autograd graph holds about twenty of them; selections below are 0/1 float factors from comparisons written
# straight into a float tensor, or torch.lerp.

_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32}
_INF_BITS = {torch.float64: 0x7FF0000000000000, torch.float32: 0x7F800000}


class _Select:
    """``sel(x)``: x where valid, +0.0 where not, bit-exact, as a new tensor (``sel(x, inplace=True)``: in x);
    ``penalty``: 0 where valid, +inf where not."""

    def __init__(self, valid: torch.Tensor, dtype: torch.dtype):
        self.int, self.dtype = _INT_OF[dtype], dtype
        self.bits = valid.to(self.int).neg_()  # all ones where valid
        self._penalty = None

    @property
    def penalty(self) -> torch.Tensor:  # made on first use: a (B, T) pass that not every loss needs
        if self._penalty is None:
            # ~bits = ~(-v) = v - 1: 0 where valid, all ones where not
            self._penalty = self.bits.bitwise_not().bitwise_and_(_INF_BITS[self.dtype]).view(self.dtype)
        return self._penalty

    def __call__(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        bits = x.view(self.int)
        return (bits.bitwise_and_(self.bits) if inplace else bits.bitwise_and(self.bits)).view(self.dtype)


def _flag(fn, a, b) -> torch.Tensor:
    """fn(a, b) (a comparison) as a 0/1 float tensor of a's dtype, in one kernel."""
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, torch.Tensor) else a.shape,
                      dtype=a.dtype, device=a.device)
    return fn(a, b, out=out)


def _valid_of(mask):
    return None if mask is None else (mask if mask.dtype == torch.bool else mask != 0)


def _aggregate(per_token_sum, row_sums, n, row_n, batch: int, agg: int, norm_len: float):
    """(loss, per-row weight w_b) of sum_bt w_b m_bt l_bt (fastalign.reference.rl, the module docstring)."""
    dtype = per_token_sum.dtype
    if agg == 0:  # token-mean
        inv_n = 1.0 / n.clamp(min=1).to(dtype)
        return per_token_sum * inv_n, inv_n.expand(batch)
    if agg == 1:  # seq-mean-token-sum
        return per_token_sum / batch, per_token_sum.new_full((batch,), 1.0 / batch)
    if agg == 2:  # seq-mean-token-mean
        w = 1.0 / (row_n.clamp(min=1).to(dtype) * batch)
        return (row_sums() * w).sum(), w
    return per_token_sum / (batch * norm_len), per_token_sum.new_full((batch,), 1.0 / (batch * norm_len))


def _torch_policy_forward(lp, old, adv, mask, *, clip_low, clip_high, dual_clip, agg, norm_len, need_grad):
    """(loss, stats (8,), unscaled grad or None, row weights): the PPO loss in the closed form.

    With u = A rho and c = A clamp(rho, 1 - eps_low, 1 + eps_high), the per-token loss is -min(u, c) (-A c with
    the dual clip bound), and its derivative in logprobs is -u where the unclipped branch is taken, 0 elsewhere;
    the grad returned is u there and the row weights are negated."""
    dtype = compute_dtype(lp, old, adv)
    batch, length = lp.shape
    valid = _valid_of(mask)
    sel = None if valid is None else _Select(valid, dtype)
    # Each new (B, T) tensor costs its page faults on first touch (as much as a pass over it on CPU): the buffers
    # made here are reused in place where the op allows.
    log_ratio = lp.to(dtype) - old.to(dtype)
    a = adv.to(dtype)
    a = a[:, None].expand(batch, length) if a.dim() == 1 else a
    if sel is not None:
        log_ratio, a = sel(log_ratio, inplace=True), sel(a)  # masked: log_ratio 0, A 0, so u = c = 0 there
    kl_sum = log_ratio.sum()
    ratio = log_ratio.exp_()
    c = ratio.clamp(1 - clip_low, 1 + clip_high).mul_(a)
    u = torch.mul(a, ratio)
    keep = _flag(torch.ge, c, u)  # 1: the unclipped branch (also at ties and masked positions); NaN -> 0
    scratch = _flag(torch.gt, a, 0)  # A > 0
    n_clip = keep.numel() - keep.sum()  # clipped: A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low
    n_high = scratch.sum() - torch.dot(keep.reshape(-1), scratch.reshape(-1))
    neg_loss = torch.minimum(u, c, out=c)
    n_dual = None
    if dual_clip is not None:
        bound = a.clamp(max=0).mul_(dual_clip)  # A c where A < 0 (minus the bound); 0 elsewhere, where -l >= 0
        dual = torch.lt(neg_loss, bound, out=scratch)
        torch.maximum(neg_loss, bound, out=neg_loss)
        keep.addcmul_(keep, dual, value=-1)  # the bound has no gradient
        n_dual = dual.sum()
    n = torch.tensor(batch * length, device=lp.device) if valid is None else valid.sum()
    row_n = None
    if agg == 2:
        row_n = torch.full((batch,), length, device=lp.device) if valid is None else valid.sum(-1)
    loss, w = _aggregate(-neg_loss.sum(), lambda: -neg_loss.sum(-1), n, row_n, batch, agg, norm_len)
    inv_n = 1.0 / n.clamp(min=1).to(dtype)
    if sel is None:
        ratio_sum, ratio_min, ratio_max = ratio.sum(), ratio.amin(), ratio.amax()
    else:
        ratio_sum = torch.sub(ratio, 1, out=scratch).sum() + n  # masked ratios are exactly 1
        ratio_min = torch.add(ratio, sel.penalty, out=scratch).amin()
        ratio_max = torch.sub(ratio, sel.penalty, out=scratch).amax()
    any_valid = n > 0
    zero = ratio_sum.new_zeros(())
    stats = torch.stack([
        n_clip * inv_n, (n_clip - n_high) * inv_n, n_high * inv_n, zero if n_dual is None else n_dual * inv_n,
        -kl_sum * inv_n, ratio_sum * inv_n,
        torch.where(any_valid, ratio_min, zero), torch.where(any_valid, ratio_max, zero),
    ]).to(dtype)
    grad = u.mul_(keep) if need_grad else None
    return loss, stats, grad, -w


def _torch_value_forward(values, old_values, returns, mask, *, clip, agg, norm_len, need_grad):
    """(loss, stats (2,), unscaled grad or None, row weights): the value loss in the closed form.

    e1 = v - R, e2 = old + clamp(v - old, -clip, clip) - R; l = max(e1^2, e2^2) / 2; the derivative in v is e1
    where e1^2 >= e2^2, else e2 where the clamp passes v through and 0 where it clips; the grad returned is that
    and the row weights are w_b."""
    dtype = compute_dtype(values, old_values, returns)
    batch, length = values.shape
    valid = _valid_of(mask)
    sel = None if valid is None else _Select(valid, dtype)
    v, r = values.to(dtype), returns.to(dtype)
    if sel is not None:
        v, r = sel(v), sel(r)
    e1 = v - r
    n = torch.tensor(batch * length, device=values.device) if valid is None else valid.sum()
    if clip is None:
        grad, n_clip = e1, None
        total = 0.5 * torch.dot(e1.reshape(-1), e1.reshape(-1))
        rows = lambda: 0.5 * (e1 * e1).sum(-1)  # noqa: E731
    else:  # new buffers reused in place where the op allows (each costs its page faults on CPU)
        o = old_values.to(dtype)
        if sel is not None:
            o = sel(o)
        dv = v - o
        dv_clipped = dv.clamp(-clip, clip)
        e2 = torch.add(o, dv_clipped).sub_(r)
        inside = torch.eq(dv_clipped, dv, out=dv)  # where the clamp passes v through (its gradient)
        sq1, sq2 = e1 * e1, e2 * e2
        clipped = torch.gt(sq2, sq1, out=dv_clipped)
        per_token = torch.maximum(sq1, sq2, out=sq2)
        total = 0.5 * per_token.sum()
        rows = lambda: 0.5 * per_token.sum(-1)  # noqa: E731
        n_clip = clipped.sum()
        grad = torch.lerp(e1, e2.mul_(inside), clipped, out=e1) if need_grad else None
    row_n = None
    if agg == 2:
        row_n = torch.full((batch,), length, device=values.device) if valid is None else valid.sum(-1)
    loss, w = _aggregate(total, rows, n, row_n, batch, agg, norm_len)
    inv_n = 1.0 / n.clamp(min=1).to(dtype)
    zero = total.new_zeros(())
    stats = torch.stack([zero if n_clip is None else n_clip * inv_n, v.sum() * inv_n]).to(dtype)
    return loss, stats, (grad if need_grad else None), w


# ------------------------------------------------------------------------------------- policy and value losses

def _loss_forward(backend, current, old, target, mask, **cfg):
    """(loss, stats, unscaled per-token grad or None, per-row scale) of the policy or the value loss."""
    if backend == "triton":
        return _kernels().rl_loss_forward(current, old, target, mask, **cfg)
    is_value = cfg.pop("is_value")
    if backend == "torch":
        if is_value:
            return _torch_value_forward(current, old, target, mask, clip=cfg["clip_low"], agg=cfg["agg"],
                                        norm_len=cfg["norm_len"], need_grad=cfg["need_grad"])
        return _torch_policy_forward(current, old, target, mask, **cfg)
    # cpp / cuda: the extension takes one dtype, contiguous tensors and a bool mask
    common = torch.promote_types(torch.promote_types(current.dtype, old.dtype), target.dtype)
    current, old, target = (x.to(common).contiguous() for x in (current, old, target))
    if is_value:  # CPU only
        clip = cfg["clip_low"] if cfg["clip_low"] is not None else 0.0
        loss, stats, grad, scale = _extension().value_loss_fwd(
            current, old, target, _loss_mask(mask, current.device), clip, cfg["agg"], cfg["norm_len"], cfg["need_grad"])
    else:
        loss, stats, grad, scale = _extension().ppo_policy_loss_fwd(
            current, old, target, _loss_mask(mask, current.device), cfg["clip_low"], cfg["clip_high"],
            cfg["dual_clip"] if cfg["dual_clip"] is not None else 0.0, cfg["agg"], cfg["norm_len"], cfg["need_grad"])
    return loss, stats, (grad if cfg["need_grad"] else None), scale


def _scales_in_place(backend: str, grad: torch.Tensor) -> bool:
    """The torch path and the CPU extension scale the saved derivative in place in the backward: the buffer becomes
    the gradient (no second (B, T) allocation, whose first touch alone costs as much as the pass on CPU)."""
    return backend == "torch" or (backend == "cpp" and grad.device.type == "cpu")


def _loss_backward(backend, grad, scale, upstream, dtype):
    if _scales_in_place(backend, grad):
        return grad.mul_((scale * upstream.to(scale.dtype))[:, None]).to(dtype)
    upstream = upstream.float().reshape(1).contiguous()
    if backend == "triton":
        return _kernels().rl_loss_backward(grad, scale, upstream, dtype)
    return _extension().ppo_policy_loss_bwd(grad, scale, upstream).to(dtype)


class _RLLossFunction(torch.autograd.Function):
    """Loss and stats in the forward; the forward's per-token derivative times w_b * upstream in the backward."""

    @staticmethod
    def forward(ctx, current, old, target, mask, backend: str, cfg: dict):
        loss, stats, grad, scale = _loss_forward(backend, current, old, target, mask, need_grad=True, **dict(cfg))
        ctx.backend, ctx.op = backend, "value_loss" if cfg["is_value"] else "ppo_policy_loss"
        ctx.current_dtype = current.dtype
        ctx.consumed = False
        ctx.save_for_backward(grad, scale)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        if ctx.consumed:  # checked before unpacking: autograd's own version check would raise less clearly
            raise RuntimeError(
                f"{ctx.op}: a second backward through the same graph (retain_graph=True) is not supported on the "
                f"{ctx.backend!r} backend: the first backward scaled the saved derivative in place into the "
                "gradient. Compute the loss again for another backward.")
        grad, scale = ctx.saved_tensors
        ctx.consumed = _scales_in_place(ctx.backend, grad)
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
    loss, stats, _, _ = _loss_forward(backend, current.detach(), old, target, mask, need_grad=False, **dict(cfg))
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
    cfg = dict(is_value=False, clip_low=clip_low, clip_high=clip_low if clip_high is None else clip_high,
               dual_clip=dual_clip, agg=_AGG_INDEX[agg], norm_len=norm)
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
        values: (B, T) fp16/bf16/fp32 (fp64 on torch / cpp), the critic's current predictions.
        old_values: (B, T) predictions at rollout time; returns: (B, T) targets (constants: requires_grad raises).
        mask: (B, T) bool or 0/1 or None. clip: None or > 0. agg, norm_len: as :func:`ppo_policy_loss`.
        backend: "auto" | "torch" | "triton" | "cpp" (CPU tensors).

    Returns:
        loss: () fp32 (fp64 for fp64 inputs on torch / cpp); stats: dict of detached () tensors: clip_frac,
        values_mean (over valid tokens). An all-masked batch gives 0 loss and 0 gradients.
    """
    op = "value_loss"
    _, length = _check_grid(op, mask, values=values, old_values=old_values, returns=returns)
    clip = positive(op, "clip", clip, allow_none=True)
    norm = agg_mode(op, agg, norm_len, length)
    _check_constants(op, old_values=old_values, returns=returns)
    dtype = compute_dtype(values, old_values, returns)
    name = _resolve(op, backend, (values, old_values, returns, mask), supports=_CPU_EXT_OPS, dtype=dtype)
    cfg = dict(is_value=True, clip_low=clip, clip_high=None, dual_clip=None, agg=_AGG_INDEX[agg], norm_len=norm)
    loss, stats = _run_loss(name, values, old_values, returns, mask, cfg)
    return loss, dict(zip(ref.VALUE_STATS, stats.unbind()))


# ------------------------------------------------------------------------------------------------- KL penalty

class _KLFunction(torch.autograd.Function):
    """The KL estimator and, in the same pass, what its backward needs: Triton recomputes from the inputs; the C++
    extension writes dkl/dlogprobs (the gradient in ref_logprobs is its negative); the torch path keeps expm1(d)
    (k3) or d (k2). The backward is one product with the upstream gradient."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, kind: str, backend: str):
        ctx.kind, ctx.backend, ctx.consumed = kind, backend, False
        ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
        need_grad = logprobs.requires_grad or ref_logprobs.requires_grad
        if backend == "triton":
            logp, ref_lp = logprobs.contiguous(), ref_logprobs.contiguous()
            ctx.save_for_backward(logp, ref_lp)
            return _kernels().kl_forward(logp, ref_lp, kind=kind)
        if backend == "cpp":
            common = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
            kl, coef = _extension().kl_penalty_fwd(logprobs.to(common).contiguous(),
                                                   ref_logprobs.to(common).contiguous(), _KL_INDEX[kind], need_grad)
            ctx.save_for_backward(coef if need_grad else None)
            return kl
        kl, saved = _torch_kl_forward(logprobs, ref_logprobs, kind)
        ctx.save_for_backward(saved)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        need_logp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.backend == "triton":
            logp, ref_lp = ctx.saved_tensors
            grad_out = grad_out.contiguous()  # incoming gradients may be expanded or strided views
            grad_logp, grad_ref = _kernels().kl_backward(
                logp, ref_lp, grad_out, kind=ctx.kind, need_logp=need_logp, need_ref=need_ref,
            )
            return grad_logp, grad_ref, None, None
        if ctx.consumed:  # checked before unpacking: autograd's own version check would raise less clearly
            raise RuntimeError(
                f"kl_penalty: a second backward through the same graph (retain_graph=True) is not supported on the "
                f"{ctx.backend!r} backend: the first backward scaled the saved derivative in place into the gradient. "
                "Compute the penalty again for another backward.")
        (saved,) = ctx.saved_tensors
        ctx.consumed = saved is not None
        if ctx.backend == "cpp":  # saved: dk/dlogp; one product with the upstream, in place (any strides)
            grad_logp = saved.mul_(grad_out)
            grad_ref = torch.neg(grad_logp) if need_ref else None
        else:
            grad_logp, grad_ref = _torch_kl_backward(ctx.kind, saved, grad_out, need_logp, need_ref)
        return (grad_logp.to(ctx.dtypes[0]) if need_logp else None,
                grad_ref.to(ctx.dtypes[1]) if need_ref else None, None, None)


def _torch_kl_forward(logprobs, ref_logprobs, kind: str):
    """(kl, what the backward keeps) in the closed form: k1 = logp - ref; k2 = d^2 / 2 (keeps d); k3 = expm1(d) - d
    (keeps expm1(d)); d = ref - logp."""
    dtype = compute_dtype(logprobs, ref_logprobs)
    logp, ref_lp = logprobs.to(dtype), ref_logprobs.to(dtype)
    if kind == "k1":
        return logp - ref_lp, None
    d = ref_lp - logp
    if kind == "k2":
        return 0.5 * d * d, d
    e = torch.expm1(d)
    return e - d, e


def _torch_kl_backward(kind: str, saved, grad_out, need_logp: bool, need_ref: bool):
    """dk/dlogp = 1 (k1), -d (k2), -expm1(d) (k3); dk/dref is its negative. ``saved`` (d or expm1(d)) is scaled in
    place into the gradient of ref_logprobs."""
    if kind == "k1":
        return grad_out, (-grad_out if need_ref else None)
    grad_ref = saved.mul_(grad_out)
    return (torch.neg(grad_ref) if need_logp else None), grad_ref


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    kind: str = "k3",
    mask: torch.Tensor | None = None,
    agg: str | None = None,
    norm_len: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token KL(pi || ref) estimators from samples of pi, with gradients to both inputs; with ``agg``, the
    masked aggregate of them as one fused loss.

    Equal to, with ``d = ref_logprobs - logprobs``: ``-d`` (k1), ``d ** 2 / 2`` (k2),
    ``torch.expm1(d) - d`` (k3, TRL GRPO's per_token_kl; verl "low_var_kl" without its clamp). With ``agg``::

        loss = (kl * mask).sum() / mask.sum().clamp(min=1)                    # agg="token-mean"

    computed like :func:`ppo_policy_loss` (the same modes; the (B, T) KL is not materialized: on CPU one pass
    computes the loss and the per-token derivative, which the backward scales in place by the row weight).

    Args:
        logprobs, ref_logprobs: (...) fp16/bf16/fp32 (fp64 on torch / cpp), same shape and device; (B, T) with
            ``agg``.
        kind: "k1" | "k2" | "k3". backend: "auto" | "torch" | "triton" | "cpp" (CPU tensors).
        mask: (B, T) bool or 0/1, nonzero = valid token, None = all valid; only with ``agg``.
        agg: None (the per-token KL) or an aggregation mode of :func:`ppo_policy_loss`; norm_len: as there.
    Returns:
        (...) fp32 (fp64 for fp64 inputs on torch / cpp); with ``agg``, the () loss (0 with 0 gradients for an
        all-masked batch).
    """
    op = "kl_penalty"
    if agg is not None:
        return _kl_aggregated(logprobs, ref_logprobs, kind=kind, mask=mask, agg=agg, norm_len=norm_len,
                              backend=backend)
    if mask is not None or norm_len is not None:
        raise ValueError(f"{op}: {'mask' if mask is not None else 'norm_len'} is only used with agg (the per-token "
                         "KL has no aggregation); pass agg='token-mean' (or another mode) for the masked loss")
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
    name = _resolve(op, backend, (logprobs, ref_logprobs), supports=_CPU_EXT_OPS, dtype=dtype)
    if logprobs.numel() == 0:
        return ref.kl_penalty(logprobs, ref_logprobs, kind=kind)
    if not (torch.is_grad_enabled() and (logprobs.requires_grad or ref_logprobs.requires_grad)):
        logprobs, ref_logprobs = logprobs.detach(), ref_logprobs.detach()
    return _KLFunction.apply(logprobs, ref_logprobs, kind, name)


# ---------------------------------------------------------------------------------------- aggregated KL penalty

def _torch_kl_loss_forward(logprobs, ref_logprobs, mask, kind: str, agg: int, norm_len: float, need_grad: bool):
    """(loss, unscaled dk/dlogp or None, row weights) of the aggregated KL in the closed form: d = ref - logp set to
    +0.0 at masked tokens (so k and its derivative are 0 there, k1's derivative is the validity)."""
    dtype = compute_dtype(logprobs, ref_logprobs)
    batch, length = logprobs.shape
    valid = _valid_of(mask)
    sel = None if valid is None else _Select(valid, dtype)
    d = ref_logprobs.to(dtype) - logprobs.to(dtype)
    if sel is not None:
        d = sel(d, inplace=True)
    # each new (B, T) buffer costs its page faults on CPU: reused in place where the op allows
    grad = None
    if kind == "k1":  # k = -d: its sums are those of d, negated
        total, rows = -d.sum(), lambda: -d.sum(-1)
        if need_grad:
            grad = torch.ones_like(d) if valid is None else valid.to(dtype)
    else:
        if kind == "k2":
            k = 0.5 * d * d
            grad = d.neg_() if need_grad else None
        else:
            e = torch.expm1(d)
            k = torch.sub(e, d, out=d)
            grad = e.neg_() if need_grad else None
        total, rows = k.sum(), lambda: k.sum(-1)
    n = torch.tensor(batch * length, device=logprobs.device) if valid is None else valid.sum()
    row_n = None
    if agg == 2:
        row_n = torch.full((batch,), length, device=logprobs.device) if valid is None else valid.sum(-1)
    loss, w = _aggregate(total, rows, n, row_n, batch, agg, norm_len)
    return loss.to(dtype), grad, w.to(dtype)


def _kl_loss_forward(backend, logprobs, ref_logprobs, mask, kind, agg, norm_len, need_grad):
    if backend == "torch":
        return _torch_kl_loss_forward(logprobs, ref_logprobs, mask, kind, agg, norm_len, need_grad)
    common = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    loss, grad, scale = _extension().kl_loss_fwd(
        logprobs.to(common).contiguous(), ref_logprobs.to(common).contiguous(), _loss_mask(mask, logprobs.device),
        _KL_INDEX[kind], agg, norm_len, need_grad)
    return loss, (grad if need_grad else None), scale


class _KLLossFunction(torch.autograd.Function):
    """The aggregated KL (torch / cpp): the loss and the unscaled per-token derivative in one pass; the backward
    scales that derivative in place by w_b * upstream (the gradient in ref_logprobs is its negative)."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, mask, kind: str, backend: str, agg: int, norm_len: float):
        loss, grad, scale = _kl_loss_forward(backend, logprobs, ref_logprobs, mask, kind, agg, norm_len, True)
        ctx.backend, ctx.consumed = backend, False
        ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
        ctx.save_for_backward(grad, scale)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.consumed:  # checked before unpacking: autograd's own version check would raise less clearly
            raise RuntimeError(
                f"kl_penalty: a second backward through the same graph (retain_graph=True) is not supported on the "
                f"{ctx.backend!r} backend: the first backward scaled the saved derivative in place into the gradient. "
                "Compute the penalty again for another backward.")
        grad, scale = ctx.saved_tensors
        ctx.consumed = _scales_in_place(ctx.backend, grad)
        need_logp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = _loss_backward(ctx.backend, grad, scale, grad_loss, grad.dtype)
        return (g.to(ctx.dtypes[0]) if need_logp else None,
                torch.neg(g).to(ctx.dtypes[1]) if need_ref else None, None, None, None, None, None)


def _kl_aggregated(logprobs, ref_logprobs, *, kind, mask, agg, norm_len, backend):
    op = "kl_penalty"
    _, length = _check_grid(op, mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    norm = agg_mode(op, agg, norm_len, length)
    if kind not in ref.KL_KINDS:
        raise ValueError(f"{op}: kind must be one of {ref.KL_KINDS}, got {kind!r}")
    dtype = compute_dtype(logprobs, ref_logprobs)
    name = _resolve(op, backend, (logprobs, ref_logprobs, mask), supports=_CPU_EXT_OPS, dtype=dtype)
    needs_grad = torch.is_grad_enabled() and (logprobs.requires_grad or ref_logprobs.requires_grad)
    if name == "triton":  # the per-token kernel, then the shared aggregation (autograd through both)
        if mask is None:
            valid = torch.ones_like(logprobs, dtype=torch.bool)
        else:  # masked inputs to 0 first: garbage there would give NaN gradients (0 * NaN) in the kernel's backward
            valid = mask != 0
            logprobs, ref_logprobs = torch.where(valid, logprobs, 0), torch.where(valid, ref_logprobs, 0)
        per_token = kl_penalty(logprobs, ref_logprobs, kind=kind, backend="triton")
        return ref.aggregate(per_token, valid, agg, norm_len)
    if needs_grad:
        return _KLLossFunction.apply(logprobs, ref_logprobs, mask, kind, name, _AGG_INDEX[agg], norm)
    loss, _, _ = _kl_loss_forward(name, logprobs.detach(), ref_logprobs.detach(), mask, kind, _AGG_INDEX[agg], norm,
                                  False)
    return loss
