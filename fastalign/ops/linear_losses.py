"""Losses straight from hidden states: per-sequence log-probs, the DPO family, the PPO/GRPO policy loss.

Each op runs the LM-head log-prob forward once (:func:`fastalign.ops.logprobs.head_forward`: the Triton kernel
or the chunked reference, never [N, V] logits), computes its loss on the O(N) per-token log-probs (and
entropies) with the reference of that loss on token log-probs (:mod:`fastalign.reference.linear_losses`), and in
backward turns that small loss into per-token upstream gradients dL/dlogp_n, dL/dH_n, which go straight into one
recompute pass (:func:`fastalign.ops.logprobs.head_backward`) for d hidden, d weight, d bias.

For sum-reduced DPO the per-token gradient is constant over each sequence: dL/dlogp_n = dL/dS_b for every
response token n of sequence b (divided by its length when length-normalised); for PPO it is
w_n * dl_n/dlogp_n with w the aggregation weight. Autograd over the O(N) -> scalar graph of the reference loss
gives exactly these values, so every loss formula exists in one place only (``fastalign.reference``); the
composition from hidden states each op must equal is :mod:`fastalign.reference.linear_losses` too.

Memory above inputs: O(N) fp32 (log-probs, lse, mu, per-token gradients) plus the head's own workspace.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fastalign.ops._checks import agg_mode, check_none, number, ppo_clips
from fastalign.ops.logprobs import (
    head_backward,
    head_forward,
    keep_head_backward,
    keep_head_forward,
    plan_head,
    prepare_head,
    resolve_head_backend,
    rounded,
)
from fastalign.ops.preference import check_dpo_options, check_lengths
from fastalign.reference import linear_losses as ref
from fastalign.reference import logprobs as ref_lp
from fastalign.reference._common import compute_dtype
from fastalign.reference import preference as ref_pref
from fastalign.reference import rl as ref_rl


class _HeadLossFunction(torch.autograd.Function):
    """loss = loss_fn(logp (N,), entropy (N,) or None, *extras) where logp/entropy come from the LM head.

    forward: the head's forward once, loss_fn without a graph. On the torch backend with tokens kept
    (:class:`fastalign.ops.logprobs.HeadPlan`) and a scalar loss, the per-token gradients of the loss for a unit
    upstream gradient are known here: dz is formed from the kept log-softmax and d hidden, d weight (fp32, summed
    over chunks) follow at once, 3 GEMM-equivalents in all (2 for a frozen head), and backward only scales them by
    ``grad_output``. A non-scalar output (per-sequence log-probs) keeps the log-softmax for the backward instead.
    backward: re-runs loss_fn (O(N) element-wise) under autograd on detached copies of logp/entropy/extras to get
    the per-token upstream gradients for ``grad_output`` (and the extras' gradients), then the tokens not done yet
    go through the head's backward (the recompute pass for tokens not kept).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, backend, need_entropy, loss_fn, stats_out: dict, plan, *extras):
        head = head._replace(hidden=hidden, weight=weight, bias=bias)
        kept = None
        if backend == "torch":
            logp, entropy, lse, mu, _, kept = keep_head_forward(head, plan, need_entropy=need_entropy)
        else:
            logp, entropy, lse, mu, _ = head_forward(head, backend, need_entropy=need_entropy)
        need_head = tuple(ctx.needs_input_grad[:3])
        ctx.unit = None
        eager = kept is not None and kept.logsm.shape[0] > 0 and any(need_head)
        if eager:  # the loss once, with a graph over its O(N) inputs, in case its output is a scalar
            with torch.enable_grad():
                logp_l = logp.detach().requires_grad_()
                ent_l = entropy.detach().requires_grad_() if entropy is not None else None
                out_l, stats = loss_fn(logp_l, ent_l, *[e.detach() if e is not None else None for e in extras])
            out = out_l.detach()
            eager = out.numel() == 1
        else:
            out, stats = loss_fn(logp, entropy, *extras)
        stats_out.update({k: v.detach() for k, v in stats.items()})  # autograd outputs must be tensors
        if eager:
            # the gradient of a scalar loss is grad_output times its gradient for grad_output = 1: form it now
            with torch.enable_grad():
                wrt = [t for t in (logp_l, ent_l) if t is not None]
                grads = torch.autograd.grad(out_l, wrt, allow_unused=True) if out_l.requires_grad else [None] * 2
            g1 = grads[0]
            e1 = grads[1] if ent_l is not None else None
            acc = compute_dtype(hidden)
            n, d = hidden.shape
            v = weight.shape[0]
            # every scored token kept in the P~ form: the GEMMs write the gradients, no zero fill first
            fresh = kept.probs and g1 is not None and kept.logsm.shape[0] == kept.rows.numel()
            alloc = torch.empty if fresh else torch.zeros
            unit = ((alloc if kept.rows.numel() == n else torch.zeros)((n, d), dtype=acc, device=hidden.device)
                    if need_head[0] else None,
                    alloc((v, d), dtype=acc, device=hidden.device) if need_head[1] else None,
                    torch.zeros(v, dtype=acc, device=hidden.device) if (need_head[2] and bias is not None) else None)
            if g1 is not None or e1 is not None:
                ref_lp.keep_backward(
                    kept, hidden, weight, head.labels, g1.to(acc) if g1 is not None else None,
                    e1.to(acc) if e1 is not None else None, temperature=head.temperature, softcap=head.softcap,
                    logit_scale=head.logit_scale, ignore_index=head.ignore_index, chunk=plan.chunk_rows, dh=unit[0],
                    dw=unit[1], db=unit[2], fresh=fresh,
                )
            else:
                unit = tuple(t.zero_() if t is not None else None for t in unit)
            ctx.unit = unit
            # the softmax is spent: only the token indices stay, for the tokens left to recompute
            kept = kept._replace(logsm=kept.logsm.new_empty((kept.logsm.shape[0], 0)), dcap=None)
        ctx.kept = kept
        ctx.chunk = plan.chunk_rows if plan is not None else 0
        ctx.budget = plan.budget_bytes if plan is not None else None
        ctx.head = head._replace(hidden=None, weight=None, bias=None)
        ctx.backend = backend
        ctx.loss_fn = loss_fn
        ctx.save_for_backward(hidden, weight, bias, lse, mu, logp, entropy, *extras)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, lse, mu, logp, entropy, *extras = ctx.saved_tensors
        need_head = ctx.needs_input_grad[:3]
        extra_needs = ctx.needs_input_grad[9:]
        if ctx.unit is not None and not any(extra_needs) and ctx.kept.logsm.shape[0] == ctx.kept.rows.numel():
            # every scored token done in the forward and no other input wants a gradient: scale, nothing else
            head = ctx.head._replace(hidden=hidden, weight=weight, bias=bias)
            scale = grad_out.reshape(()).to(compute_dtype(hidden))
            dh, dw, db = rounded(head, *(t * scale if t is not None else None for t in ctx.unit))
            return (dh, dw, db, None, None, None, None, None, None, *[None] * len(extras))
        with torch.enable_grad():
            logp_l = logp.detach().requires_grad_(any(need_head))
            ent_l = entropy.detach().requires_grad_(any(need_head)) if entropy is not None else None
            extras_l = [
                e.detach().requires_grad_(True) if (e is not None and need) else e
                for e, need in zip(extras, extra_needs)
            ]
            out, _ = ctx.loss_fn(logp_l, ent_l, *extras_l)
            wrt = [t for t in (logp_l, ent_l, *extras_l) if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True) if wrt else ())
        g_logp = next(grads) if logp_l.requires_grad else None
        g_ent = next(grads) if ent_l is not None and ent_l.requires_grad else None
        g_extras = [next(grads) if (e is not None and e.requires_grad) else None for e in extras_l]
        dh = dw = db = None
        head = ctx.head._replace(hidden=hidden, weight=weight, bias=bias)
        if ctx.unit is not None:  # done in the forward for a unit upstream gradient: scale; recompute the rest
            scale = grad_out.reshape(()).to(compute_dtype(hidden))
            # out of place: a second backward (retain_graph, gradcheck) scales the same unit gradients again
            into = tuple(t * scale if t is not None else None for t in ctx.unit)
            dh, dw, db = rounded(head, *keep_head_backward(head, ctx.kept, lse, mu, g_logp, g_ent, need_head,
                                                           ctx.chunk, into=into, rest_only=True))
        elif any(need_head) and (g_logp is not None or g_ent is not None):
            if ctx.kept is not None:
                dh, dw, db = rounded(head, *keep_head_backward(head, ctx.kept, lse, mu, g_logp, g_ent, need_head,
                                                               ctx.chunk))
            else:
                dh, dw, db = head_backward(head, ctx.backend, lse, mu, g_logp, g_ent, need_head, ctx.budget)
        elif any(need_head):  # the loss does not depend on the head (e.g. an empty batch): zero gradients
            dh = torch.zeros_like(hidden) if need_head[0] else None
            dw = torch.zeros_like(weight) if need_head[1] else None
            db = torch.zeros_like(bias) if (need_head[2] and bias is not None) else None
        return (dh, dw, db, None, None, None, None, None, None, *g_extras)


def _head_loss(head, backend, need_entropy: bool, loss_fn: Callable, extras: tuple, *, op: str, memory_budget):
    """Run ``loss_fn`` on the head's log-probs with the fused backward when any gradient is needed."""
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (head.hidden, head.weight, head.bias))
    needs_grad = any(needs) or (grad_on and any(t is not None and t.requires_grad for t in extras))
    plan = plan_head(head, backend, op=op, needs=needs, need_entropy=need_entropy, memory_budget=memory_budget)
    if not needs_grad:  # forward only: nothing is saved
        if backend == "torch":
            logp, entropy, _, _, _, _ = keep_head_forward(head, plan, need_entropy=need_entropy)
        else:
            logp, entropy, _, _, _ = head_forward(head, backend, need_entropy=need_entropy)
        out, stats = loss_fn(logp, entropy, *extras)
        return out, {k: v.detach() for k, v in stats.items()}
    stats: dict = {}
    out = _HeadLossFunction.apply(
        head.hidden, head.weight, head.bias, head, backend, need_entropy, loss_fn, stats, plan, *extras
    )
    return out, stats


def _prepare_batched_head(op, hidden, weight, labels, *, bias, temperature, softcap, ignore_index):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{op}: hidden must have shape (B, T, D), got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{op}: labels must have shape {tuple(hidden.shape[:2])} (hidden.shape[:2]), got {shape}")
    return prepare_head(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index, op=op
    )


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
    memory_budget: int | str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence sum (or mean) of response-token log-probs, straight from hidden states.

    Equal to::

        logp = linear_logprobs(hidden, weight, labels, ...).logprobs             # (B, T), 0 where ignored
        out = sequence_logprobs(logp, labels != ignore_index, average=average)   # (B,)

    but the backward needs no per-token autograd graph: the upstream gradient of each sequence becomes the
    per-token gradient of its tokens (divided by the length when ``average``) in one recompute pass.

    Args:
        hidden: (B, T, D) bf16/fp16/fp32 (fp64 on the torch backend). weight: (V, D) same dtype.
        labels: (B, T) int target ids; ``ignore_index`` marks prompt and padding positions.
        bias, temperature, softcap, ignore_index, memory_budget, backend: as in :func:`fastalign.linear_logprobs`.
        average: mean over the response tokens instead of the sum (0 for a sequence with none).
    Returns:
        (B,) fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight, bias.
    """
    op = "linear_sequence_logprobs"
    head = _prepare_batched_head(
        op, hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index
    )
    backend = resolve_head_backend(backend, head, op=op)
    valid = (head.labels != head.ignore_index).view(head.shape)
    average = bool(average)

    def loss_fn(logp, entropy):
        return ref_pref.sequence_logprobs(logp.view(head.shape), valid, average=average), {}

    out, _ = _head_loss(head, backend, False, loss_fn, (), op=op, memory_budget=memory_budget)
    return out


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
    discopop_tau: float | None = None,
    length_normalize: bool | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    memory_budget: int | str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss straight from the policy's last hidden states; chosen and rejected in one batch.

    Equal to::

        logp = linear_logprobs(hidden, weight, labels, ...).logprobs             # (2B, T)
        valid = labels != ignore_index
        seq = sequence_logprobs(logp, valid)                                     # (2B,) sums
        lengths = valid.sum(-1)
        loss, stats = dpo_loss(seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps, beta=beta,
                               loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                               gamma=gamma, discopop_tau=discopop_tau, chosen_lengths=lengths[:B],
                               rejected_lengths=lengths[B:], length_normalize=length_normalize)

    without [2B T, V] logits and without a per-token autograd graph: backward is one recompute pass fed with
    dL/dlogp_n = dL/dS_b (/ L_b), constant over the response tokens of each sequence b. Every loss type of
    :func:`fastalign.dpo_loss` runs here, combinations included: each is a function of the per-sequence sums and
    lengths (``sft``'s token-mean NLL is sum / count; ``aot`` sorts the batch's per-sequence values).

    Args:
        hidden: (2B, T, D) bf16/fp16/fp32; rows [0, B) are the chosen responses, [B, 2B) the rejected ones of
            the same prompts. weight: (V, D), bias: (V,) or None.
        labels: (2B, T) int; ``ignore_index`` at prompt and padding positions. Every sequence needs at least
            one response token.
        ref_chosen_logps, ref_rejected_logps: (B,) float reference log-prob sums (None when every type is
            reference-free: ``simpo``, ``sft``).
        beta, loss_type, loss_weights, label_smoothing, gamma, discopop_tau: as in :func:`fastalign.dpo_loss`.
        length_normalize: divide log-ratios by the response lengths. None (default): for ``sigmoid_norm``,
            ``ipo`` (as TRL) and ``simpo`` (as the SimPO paper), not otherwise; True: every type (with
            ``sigmoid``: TRL's ``sigmoid_norm``); False: none.
        temperature, softcap, ignore_index, memory_budget, backend: as in :func:`fastalign.linear_logprobs`.
    Returns:
        loss: () fp32; stats: detached () tensors as :func:`fastalign.dpo_loss` (``logps/*`` are sums).

    Raises:
        ValueError naming the argument: an odd batch, reference log-probs not of shape (B,), a sequence with no
        response token, beta <= 0, unknown loss_type, an option the loss type does not use.
    """
    op = "linear_dpo_loss"
    has_ref = ref_chosen_logps is not None or ref_rejected_logps is not None
    opts = check_dpo_options(
        op, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, has_reference=has_ref,
        loss_weights=loss_weights, discopop_tau=discopop_tau,
    )
    check_lengths(op, opts.loss_type, length_normalize, True, from_caller=False)  # lengths: from the labels
    head = _prepare_batched_head(
        op, hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index
    )
    backend = resolve_head_backend(backend, head, op=op)
    rows = head.shape[0]
    if rows % 2:
        raise ValueError(
            f"{op}: hidden and labels must hold 2B sequences (B chosen, then B rejected); got an odd batch of {rows}"
        )
    pairs = rows // 2
    extras = ()
    if has_ref:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{op}: {name} must be a floating-point tensor of shape ({pairs},)")
            if t.shape != (pairs,):
                raise ValueError(
                    f"{op}: {name} must have shape ({pairs},), one value per pair (hidden holds {rows} = 2 x "
                    f"{pairs} sequences), got {tuple(t.shape)}"
                )
            if t.device != head.hidden.device:
                raise ValueError(f"{op}: {name} is on {t.device}, expected {head.hidden.device}")
        extras = (ref_chosen_logps, ref_rejected_logps)
    valid = (head.labels != head.ignore_index).view(head.shape)
    empty = valid.sum(-1) == 0

    def which_row() -> str:
        first = int(empty.nonzero()[0, 0])
        which = f"chosen response of pair {first}" if first < pairs else f"rejected response of pair {first - pairs}"
        return f" (labels row {first}, the {which})"

    check_none(op, empty, f"a sequence has no response token (every label equals ignore_index={head.ignore_index}); "
               "DPO needs at least one per sequence", which_row)

    def loss_fn(logp, entropy, *refs):
        return ref.dpo_loss_from_logprobs(
            logp.view(head.shape), valid, *refs, beta=opts.beta, loss_type=opts.loss_type,
            loss_weights=opts.loss_weights, label_smoothing=opts.label_smoothing, gamma=opts.gamma,
            discopop_tau=opts.discopop_tau, length_normalize=length_normalize,
        )

    return _head_loss(head, backend, False, loss_fn, extras, op=op, memory_budget=memory_budget)


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
    memory_budget: int | str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO / GRPO actor loss straight from hidden states: log-probs, entropy, clipped surrogate, KL, aggregation.

    Equal to::

        out = linear_logprobs(hidden, weight, labels, return_entropy=..., ...)   # (B, T)
        pg, stats = ppo_policy_loss(out.logprobs, old_logprobs, advantages, mask, clip_low=..., clip_high=...,
                                    dual_clip=..., agg=agg)
        loss = pg + kl_coef * aggregate(kl_penalty(out.logprobs, ref_logprobs, kind=kl_kind), mask, agg)
                  - entropy_coef * aggregate(out.entropy, mask, agg)

    (verl's actor loss; TRL GRPOTrainer adds beta * per-token k3 KL before aggregating, the same by linearity),
    without [B T, V] logits and without a per-token autograd graph: backward feeds dL/dlogp_n and dL/dH_n into
    one recompute pass.

    Args:
        hidden: (B, T, D) bf16/fp16/fp32. weight: (V, D), bias: (V,) or None.
        labels: (B, T) int sampled token ids; ``ignore_index`` at positions without a target.
        old_logprobs: (B, T) float behaviour-policy log-probs, or None when the batch is on-policy (one update per
            rollout, as GRPO's default): the current log-probs, detached, so the ratio is 1 and the gradient is the
            plain policy gradient; saves a separate no-grad scoring pass.
        advantages: (B, T), or (B,) broadcast over T.
        mask: (B, T) bool or 0/1 response mask; None means ``labels != ignore_index``. A masked-in position must
            have a label; masked-out positions are skipped by the kernels.
        ref_logprobs: (B, T) float reference log-probs; required when ``kl_coef != 0``, otherwise only logged.
        kl_coef, kl_kind: KL penalty weight and estimator (k1 | k2 | k3).
        entropy_coef: entropy bonus weight (the loss subtracts entropy_coef * aggregated entropy).
        clip_low, clip_high, dual_clip, agg, norm_len: as in :func:`fastalign.ppo_policy_loss`.
        return_entropy: compute the entropy (and its stat) even when ``entropy_coef == 0``.
        temperature, softcap, ignore_index, memory_budget, backend: as in :func:`fastalign.linear_logprobs`.
    Returns:
        loss: () fp32; stats: detached () tensors: those of ``ppo_policy_loss`` plus ``pg_loss``, ``kl`` (mean
        per-token KL, when ``ref_logprobs`` is given) and ``entropy`` (mean, when computed).
    """
    op = "linear_policy_loss"
    head = _prepare_batched_head(
        op, hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index
    )
    backend = resolve_head_backend(backend, head, op=op)
    shape, device = head.shape, head.hidden.device
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor of shape {tuple(shape)}")
        if t.shape != shape:
            raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (labels' shape), got {tuple(t.shape)}")
    if not isinstance(advantages, torch.Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError(f"{op}: advantages must be a floating-point tensor of shape {tuple(shape)} or ({shape[0]},)")
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"{op}: advantages must have shape {tuple(shape)} or ({shape[0]},), got {tuple(advantages.shape)}"
        )
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs),
                    ("mask", mask)):
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    kl_coef = number(op, "kl_coef", kl_coef)
    entropy_coef = number(op, "entropy_coef", entropy_coef)
    # the same option rules as fa.ppo_policy_loss
    clip_low, clip_high, dual_clip = ppo_clips(op, clip_low, clip_high, dual_clip)
    agg_mode(op, agg, norm_len, shape[1])
    if kl_kind not in ref_rl.KL_KINDS:
        raise ValueError(f"{op}: kl_kind must be one of {ref_rl.KL_KINDS}, got {kl_kind!r}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"{op}: kl_coef={kl_coef} needs ref_logprobs")

    has_label = (head.labels != head.ignore_index).view(shape)
    if mask is None:
        valid = has_label
    else:
        if not isinstance(mask, torch.Tensor) or mask.shape != shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{op}: mask must have shape {tuple(shape)}, got {got}")
        valid = mask != 0
        check_none(op, valid & ~has_label, f"mask marks positions whose labels equal ignore_index={head.ignore_index}")
        # positions outside the mask do not enter the loss: let the kernels skip them
        head = head._replace(labels=torch.where(valid.reshape(-1), head.labels, head.ignore_index))
    need_entropy = entropy_coef != 0 or bool(return_entropy)
    extras = (old_logprobs, advantages) + ((ref_logprobs,) if ref_logprobs is not None else ())

    def loss_fn(logp, entropy, old, adv, *ref_lp):
        return ref.policy_loss_from_logprobs(
            logp.view(shape), entropy.view(shape) if entropy is not None else None, valid, old, adv, *ref_lp,
            kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, agg=agg, norm_len=norm_len,
        )

    return _head_loss(head, backend, need_entropy, loss_fn, extras, op=op, memory_budget=memory_budget)
