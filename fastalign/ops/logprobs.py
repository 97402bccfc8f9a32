"""Token log-probs from logits or straight from hidden states: validation, dispatch, autograd, public functions.

The kernels and their launchers are :mod:`fastalign.kernels.logprobs`; the torch twin of each launcher (same
arguments, same results) is :mod:`fastalign.reference.logprobs`.

The building blocks :func:`prepare_head`, :func:`head_forward` and :func:`head_backward` are shared with the
fused losses (``linear_dpo_loss``, ``linear_policy_loss``): they run the forward once and feed any per-token
upstream gradient into the recompute pass, without an autograd graph over [N, V].
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from typing import NamedTuple

import torch

from fastalign import _backend
from fastalign.kernels import _common
from fastalign.kernels._common import TRITON_DTYPES
from fastalign.ops import _checks
from fastalign.ops._checks import check_none, float_tensor, number, positive, tensor
from fastalign.reference import logprobs as ref
from fastalign.reference._common import compute_dtype


class LogprobsOutput(NamedTuple):
    """logprobs: (...) fp32, 0 at ignored positions; entropy: (...) fp32 or None; the statistics
    (:func:`linear_logprobs` only, None unless asked for): mean_logits, log_sum_sq_probs (...) fp32 and
    is_top1 (...) bool, 0 / False at ignored positions."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


class Head(NamedTuple):
    """Validated, flattened inputs of one LM-head log-prob computation."""

    hidden: torch.Tensor  # (N, D), any strides
    weight: torch.Tensor  # (V, D), any strides
    bias: torch.Tensor | None  # (V,)
    labels: torch.Tensor  # (N,) int64, contiguous
    temperature: float
    softcap: float | None
    ignore_index: int
    shape: torch.Size  # hidden.shape[:-1], the shape of per-token outputs
    logit_scale: float = 1.0  # multiplies h W^T + b before softcap and temperature


def validate_labels(labels: torch.Tensor, vocab: int, ignore_index: int, *, op: str) -> None:
    """Raise if any label is outside [0, vocab) and not ``ignore_index``: one small reduction; no host sync on
    CUDA (a device-side assert, see :func:`fastalign.ops._checks.check_none`)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)

    def details() -> str:
        return f"; found {labels[bad][0].item()} ({int(bad.sum())} such labels)"

    check_none(op, bad, f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}", details)


def prepare_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    op: str = "linear_logprobs",
) -> Head:
    """Check shapes, dtypes, devices and label range; flatten tokens. Errors name the offending argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        tensor(op, name, t)
    float_tensor(op, "hidden", hidden)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"{op}: hidden must have shape (..., D) with D > 0, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{op}: weight must have shape (V, D={hidden.shape[-1]}) with V > 0, got {tuple(weight.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    shape = hidden.shape[:-1]
    n = math.prod(shape)
    if labels.shape != shape and not (labels.dim() == 1 and labels.numel() == n):
        raise ValueError(
            f"{op}: labels must have shape {tuple(shape)} (hidden.shape[:-1]) or ({n},), got {tuple(labels.shape)}"
        )
    tensor(op, "bias", bias, allow_none=True)
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"{op}: hidden, weight, labels and bias must be on one device, got "
            f"hidden={hidden.device}, weight={weight.device}, labels={labels.device}"
            + (f", bias={bias.device}" if bias is not None else "")
        )
    temperature = positive(op, "temperature", temperature)
    softcap = positive(op, "softcap", softcap, allow_none=True)
    logit_scale = number(op, "logit_scale", logit_scale)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = labels.reshape(n).long().contiguous()
    validate_labels(labels, weight.shape[0], ignore_index, op=op)
    return Head(hidden.reshape(n, hidden.shape[-1]), weight, bias, labels, temperature, softcap, ignore_index, shape,
                logit_scale)


# ------------------------------------------------------------------------------------------------ the plan
logger = logging.getLogger("fastalign")
# the torch backend's chunk of token rows: [chunk, V] compute-dtype logits of about this many bytes, so the
# log-softmax and dz passes over a chunk run in the core's L2 / the shared L3 right after its GEMM wrote it
CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 16
_last = threading.local()


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How one call of the LM head ran (``fastalign.last_head_plan()`` returns the latest of this thread).

    path: "keep" (every scored token's softmax kept or its gradient formed in the forward: no recompute),
    "recompute" (O(N) saved, logits rebuilt in the backward), "mixed" (the first ``kept_rows`` tokens kept, the
    others recomputed) or "forward" (no gradient asked for). tokens: the scored (non-ignored) tokens, or all
    tokens on the Triton backend (which counts them on the device). chunk_rows: token rows per [chunk, V] pass of
    the torch backend (0 on Triton). budget_bytes / budget_from: the budget and where it came from ("argument",
    the environment variable's name, or "default"). kept_bytes: the bytes held for the kept tokens. gemms: GEMM
    equivalents of forward + backward over the scored tokens (a [tokens, D] x [D, V] product each)."""

    op: str
    backend: str
    path: str
    tokens: int
    vocab: int
    kept_rows: int
    chunk_rows: int
    budget_bytes: int
    budget_from: str
    kept_bytes: int
    gemms: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def last_head_plan() -> HeadPlan | None:
    """The :class:`HeadPlan` of the latest ``linear_logprobs`` / fused-loss call in this thread (None before any)."""
    return getattr(_last, "plan", None)


def resolve_budget(memory_budget, device: torch.device, *, op: str) -> tuple[int, str]:
    """(bytes, source) of a call's budget: the argument (an int or a string such as "512MiB"), else
    ``FASTALIGN_HEAD_BUDGET``, else the default (kernels/_common.default_head_budget)."""
    if memory_budget is not None:
        return _common.parse_bytes(memory_budget, name=f"{op}: memory_budget"), "argument"
    if os.environ.get(_common.HEAD_BUDGET_ENV, "").strip():
        return _common.head_memory_budget(device), _common.HEAD_BUDGET_ENV
    return _common.head_memory_budget(device), "default"


def plan_head(head: "Head", backend: str, *, op: str, needs=(False, False, False), need_entropy: bool = False,
              memory_budget=None, tokens: int | None = None) -> HeadPlan:
    """Pick keep / recompute for one call (see :class:`HeadPlan`); logged at debug level and kept for
    :func:`last_head_plan`. ``needs``: which of (d hidden, d weight, d bias) the call's backward computes."""
    budget, source = resolve_budget(memory_budget, head.hidden.device, op=op)
    v = head.weight.shape[0]
    if tokens is None:  # counting the scored tokens reads the device: not where checks are deferred (CUDA)
        count = backend == "torch" and not _checks.deferred_checks(head.hidden.device)
        tokens = int((head.labels != head.ignore_index).sum()) if count else head.labels.numel()
    grads = any(needs)
    if backend != "torch":
        chunk_rows, kept = 0, 0
    else:
        elem = torch.empty((), dtype=compute_dtype(head.hidden)).element_size()
        # a kept token holds V numbers (the P~ form); with an entropy gradient and a softcap, L and c' (2 V)
        per_row = v * elem * (2 if (head.softcap is not None and need_entropy) else 1)
        chunk_rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (v * elem))
        kept = min(tokens, budget // per_row) if grads else 0
        if kept < tokens:  # whole chunks only, so no chunk straddles the kept / recomputed boundary needlessly
            kept = kept // chunk_rows * chunk_rows if kept >= chunk_rows else kept
        chunk_rows = max(1, min(chunk_rows, tokens)) if tokens else chunk_rows
    bwd = int(needs[0]) + int(needs[1])
    if not grads:
        path, gemms = "forward", 1.0
    else:
        frac = kept / tokens if tokens else 1.0
        path = "keep" if tokens and kept == tokens else "recompute" if kept == 0 else "mixed"
        gemms = 1.0 + frac * bwd + (1.0 - frac) * (1 + bwd)
    kept_bytes = kept * per_row if backend == "torch" else 0
    plan = HeadPlan(op, backend, path, int(tokens), v, int(kept), int(chunk_rows), int(budget), source,
                    int(kept_bytes), round(gemms, 3))
    _last.plan = plan
    logger.debug("%s: %s path, %d of %d tokens kept, %d-row chunks, V=%d, budget %d bytes (%s), %.2f GEMMs",
                 op, path, kept, tokens, chunk_rows, v, budget, source, gemms)
    return plan


# ------------------------------------------------------------------------------------------- backend-generic core

def resolve_head_backend(backend: str, head: Head, *, op: str) -> str:
    name = _backend.resolve(backend, (head.hidden, head.weight, head.labels, head.bias), op=op)
    if name == "triton" and head.hidden.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: backend='triton' supports fp16/bf16/fp32 hidden, got {head.hidden.dtype}")
    return name


def _implementation(backend: str):
    """The module whose ``linear_logprobs_forward`` / ``_backward`` run a resolved backend (same signatures)."""
    if backend == "triton":
        from fastalign.kernels import logprobs as kernels  # imported on first use: after TRITON_INTERPRET is set

        return kernels
    return ref


def head_forward(head: Head, backend: str, *, need_entropy: bool, stats: tuple[str, ...] = ()):
    """Forward of one resolved backend. Returns (logp (N,), entropy (N,) or None, lse (N,), mu (N,) or None,
    a dict of the ``stats`` asked for: names from ``reference.logprobs.STATS``, computed in the same pass)."""
    return _implementation(backend).linear_logprobs_forward(
        head.hidden, head.weight, head.labels, head.bias, temperature=head.temperature, softcap=head.softcap,
        ignore_index=head.ignore_index, need_entropy=need_entropy, logit_scale=head.logit_scale, stats=stats,
    )


def head_backward(head: Head, backend: str, lse, mu, grad_logp, grad_entropy, needs=(True, True, True),
                  memory_budget: int | None = None):
    """Gradients (dh (N, D), dW (V, D), db (V,)) for per-token upstream gradients ``grad_logp`` / ``grad_entropy``
    ((N,) float or None). Incoming gradients are made contiguous fp32 (fp64 for fp64 inputs) here.
    ``memory_budget``: the call's budget in bytes, which sizes the Triton backward's vocabulary chunks."""
    acc = compute_dtype(head.hidden)
    grad_logp = grad_logp.to(acc).contiguous() if grad_logp is not None else None
    grad_entropy = grad_entropy.to(acc).contiguous() if grad_entropy is not None else None
    extra = {"memory_budget": memory_budget} if (backend == "triton" and memory_budget is not None) else {}
    return _implementation(backend).linear_logprobs_backward(
        head.hidden, head.weight, head.labels, head.bias, lse, mu, grad_logp, grad_entropy,
        temperature=head.temperature, softcap=head.softcap, ignore_index=head.ignore_index, needs=needs,
        logit_scale=head.logit_scale, **extra,
    )


def keep_head_forward(head: Head, plan: HeadPlan, *, need_entropy: bool, stats: tuple[str, ...] = ()):
    """The torch backend's forward (:func:`fastalign.reference.logprobs.keep_forward`): head_forward's five results
    and the :class:`~fastalign.reference.logprobs.Kept` softmax of the first ``plan.kept_rows`` scored tokens."""
    return ref.keep_forward(
        head.hidden, head.weight, head.labels, head.bias, temperature=head.temperature, softcap=head.softcap,
        ignore_index=head.ignore_index, need_entropy=need_entropy, logit_scale=head.logit_scale, stats=stats,
        chunk=plan.chunk_rows, keep_rows=plan.kept_rows, compact=not _checks.deferred_checks(head.hidden.device),
        need_lse=plan.path in ("mixed", "recompute"),
    )


def keep_head_backward(head: Head, kept, lse, mu, grad_logp, grad_entropy, needs, chunk: int, *, into=None,
                       rest_only: bool = False):
    """Gradients (dh, dW, db) in the compute dtype, not rounded (None where not needed): the kept tokens from their
    saved softmax (2 GEMMs a chunk, 1 without dW), the other scored tokens by recomputing their logits.

    into: accumulators (dh, dW, db) to add to (else zeros); rest_only: only the tokens that were not kept (the
    kept ones are in ``into`` already)."""
    acc = compute_dtype(head.hidden)
    n, d = head.hidden.shape
    v = head.weight.shape[0]
    dev = head.hidden.device
    # every valid token kept in the P~ form, a gradient to form: the GEMMs write dW (and dh with no token ignored)
    fresh = (into is None and not rest_only and kept.probs and grad_logp is not None
             and kept.logsm.shape[0] == kept.rows.numel() > 0)
    if into is not None:
        dh, dw, db = into
    else:
        alloc_dh = torch.empty if (fresh and kept.rows.numel() == n) else torch.zeros
        dh = alloc_dh((n, d), dtype=acc, device=dev) if needs[0] else None
        dw = (torch.empty if fresh else torch.zeros)((v, d), dtype=acc, device=dev) if needs[1] else None
        db = torch.zeros(v, dtype=acc, device=dev) if (needs[2] and head.bias is not None) else None
    if grad_logp is None and grad_entropy is None:
        return dh, dw, db
    g = grad_logp.to(acc) if grad_logp is not None else None
    e = grad_entropy.to(acc) if grad_entropy is not None else None
    scalars = dict(temperature=head.temperature, softcap=head.softcap, logit_scale=head.logit_scale)
    if not rest_only:
        scalars_k = dict(scalars, ignore_index=head.ignore_index)
        ref.keep_backward(kept, head.hidden, head.weight, head.labels, g, e, chunk=chunk, dh=dh, dw=dw, db=db,
                          fresh=fresh, **scalars_k)
    rest = kept.rows[kept.logsm.shape[0]:]
    if rest.numel():
        dh_rest = torch.zeros((rest.numel(), d), dtype=acc, device=dev) if dh is not None else None
        sub = lambda t: t.index_select(0, rest) if t is not None else None  # noqa: E731
        ref.linear_logprobs_backward(
            head.hidden.index_select(0, rest), head.weight, head.labels.index_select(0, rest), head.bias, sub(lse),
            sub(mu), sub(g), sub(e), ignore_index=head.ignore_index, needs=needs, chunk=chunk, into=(dh_rest, dw, db),
            **scalars,
        )
        if dh is not None:
            dh.index_add_(0, rest, dh_rest)
    return dh, dw, db


def rounded(head: Head, dh, dw, db):
    """Gradients in the dtypes of hidden, weight and bias (one rounding each)."""
    return (dh.to(head.hidden.dtype) if dh is not None else None, dw.to(head.weight.dtype) if dw is not None else None,
            db.to(head.bias.dtype) if db is not None else None)


class LinearLogprobsFunction(torch.autograd.Function):
    """Forward saves O(N) statistics (lse, mu), and on the torch backend the log-softmax of the tokens the plan
    keeps; backward forms dz from what was kept (2 GEMMs) and recomputes the logits of the others tile by tile.

    Returns logp, entropy (or None) and one tensor per requested stat, in ``stats`` order; the stats are
    metrics (TRL logs them and weighs WPO with them under no_grad): non-differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: Head, backend: str, return_entropy: bool, stats: tuple = (),
                plan: HeadPlan | None = None):
        # an entropy computed for logging only gets no gradient: None, not a materialized zero to multiply
        ctx.set_materialize_grads(False)
        head = head._replace(hidden=hidden, weight=weight, bias=bias)
        ctx.kept = None
        if backend == "torch" and plan is not None:
            logp, entropy, lse, mu, extras, kept = keep_head_forward(head, plan, need_entropy=return_entropy,
                                                                     stats=stats)
            ctx.kept, ctx.chunk = kept, plan.chunk_rows
        else:
            logp, entropy, lse, mu, extras = head_forward(head, backend, need_entropy=return_entropy, stats=stats)
        ctx.head = head._replace(hidden=None, weight=None, bias=None)
        ctx.backend = backend
        ctx.budget = plan.budget_bytes if plan is not None else None
        ctx.save_for_backward(hidden, weight, bias, lse, mu)
        values = [extras[name] for name in stats]
        ctx.mark_non_differentiable(*values)
        return (logp, entropy, *values)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, lse, mu = ctx.saved_tensors
        head = ctx.head._replace(hidden=hidden, weight=weight, bias=bias)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if ctx.kept is not None:
            dh, dw, db = rounded(head, *keep_head_backward(head, ctx.kept, lse, mu, grad_logp, grad_entropy, needs,
                                                           ctx.chunk))
        else:
            dh, dw, db = head_backward(head, ctx.backend, lse, mu, grad_logp, grad_entropy, needs, ctx.budget)
        return dh, dw, db, None, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_mean_logits: bool = False,
    return_is_top1: bool = False,
    return_log_sum_sq_probs: bool = False,
    memory_budget: int | str | None = None,
    backend: str = "auto",
) -> LogprobsOutput:
    """Per-token log-probs of ``labels`` (and entropy, and TRL's per-token statistics) from hidden states and the
    LM-head weight.

    Equal to::

        logits = hidden.float() @ weight.float().T + bias          # never materialized here
        logits = logits * logit_scale
        logits = softcap * torch.tanh(logits / softcap)             # if softcap
        z = logits / temperature
        logp = torch.log_softmax(z, -1).gather(-1, labels[..., None])[..., 0]
        mean_logits = z.mean(-1); is_top1 = z.argmax(-1) == labels
        log_sum_sq_probs = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)

    with every output 0 (False), and zero gradient, where ``labels == ignore_index``.

    Args:
        hidden: (..., D) bf16/fp16/fp32 (fp64 on the torch backend) last hidden states.
        weight: (V, D) same dtype; the LM head (the embedding matrix for tied models).
        labels: (...) or (N,) integer target ids in [0, V), or ``ignore_index``.
        bias: (V,) optional LM-head bias.
        temperature: > 0, divides the (softcapped) logits, as samplers do.
        softcap: optional c > 0: logits -> c * tanh(logits / c) before temperature (Gemma-style).
        logit_scale: a finite number multiplying the raw logits before softcap (Cohere's ``logit_scale``,
            Granite's ``1 / logits_scaling``).
        return_entropy: also return the entropy of each token's distribution (differentiable).
        return_mean_logits: the mean over the vocabulary of the (scaled, capped, tempered) logits.
        return_is_top1: whether the label is the arg-max; a tie goes to the lowest index, as ``torch.argmax``.
        return_log_sum_sq_probs: log sum_j p_j^2 (WPO's weights). The three statistics come from the same pass
            over the vocabulary as the log-probs and are not differentiable.
        memory_budget: bytes (an int, or a string such as "512MiB" / "2GiB") the head may hold for logits: on the
            torch backend the log-softmax of as many scored tokens as fit ([tokens, V] in fp32, twice that with a
            softcap) is kept for the backward, which then runs 2 GEMMs (1 without d weight) instead of recomputing
            the logits; the Triton backend sizes its backward's vocabulary chunks with it. None: the environment
            variable ``FASTALIGN_HEAD_BUDGET``, else half the free memory of a CUDA device or a quarter of the
            available RAM. ``fastalign.last_head_plan()`` says what the call did.
        backend: "auto" | "torch" | "triton" (see :mod:`fastalign._backend`).

    Returns:
        LogprobsOutput(logprobs fp32, entropy fp32 or None, mean_logits fp32 or None, is_top1 bool or None,
        log_sum_sq_probs fp32 or None), each shaped like ``hidden.shape[:-1]``.
    """
    head = prepare_head(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        ignore_index=ignore_index,
    )
    name = resolve_head_backend(backend, head, op="linear_logprobs")
    wanted = (("mean_logits", return_mean_logits), ("is_top1", return_is_top1),
              ("log_sum_sq_probs", return_log_sum_sq_probs))
    stats = tuple(stat for stat, flag in wanted if flag)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (head.hidden, head.weight, head.bias))
    plan = plan_head(head, name, op="linear_logprobs", needs=needs, need_entropy=bool(return_entropy),
                     memory_budget=memory_budget)
    if any(needs):
        logp, entropy, *values = LinearLogprobsFunction.apply(
            head.hidden, head.weight, head.bias, head, name, bool(return_entropy), stats, plan
        )
    elif name == "torch":  # forward only: nothing saved beyond the outputs
        logp, entropy, _, _, extras, _ = keep_head_forward(head, plan, need_entropy=bool(return_entropy), stats=stats)
        values = [extras[stat] for stat in stats]
    else:
        logp, entropy, _, _, extras = head_forward(head, name, need_entropy=bool(return_entropy), stats=stats)
        values = [extras[stat] for stat in stats]
    shaped = {stat: value.view(head.shape) for stat, value in zip(stats, values)}
    return LogprobsOutput(logp.view(head.shape), entropy.view(head.shape) if entropy is not None else None, **shaped)


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> LogprobsOutput:
    """Per-token log-probs (and entropy) when the logits already exist.

    Equal to ``torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]``, 0 at
    ignored positions. Computed in row chunks so that no fp32 copy of all logits is made.

    Args:
        logits: (..., V) any float dtype. labels: (...) int.
    Returns:
        LogprobsOutput(logprobs (...) fp32, entropy (...) fp32 or None).
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logprobs_from_logits: logits must be a floating-point tensor")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError("logprobs_from_logits: labels must be an integer tensor")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"logprobs_from_logits: labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"logprobs_from_logits: labels on {labels.device} but logits on {logits.device}")
    temperature = positive("logprobs_from_logits", "temperature", temperature)
    validate_labels(labels, logits.shape[-1], ignore_index, op="logprobs_from_logits")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    outs = [
        ref.logprobs_from_logits(
            flat_logits[i:i + ref.DEFAULT_CHUNK], flat_labels[i:i + ref.DEFAULT_CHUNK], temperature=temperature,
            ignore_index=ignore_index, return_entropy=return_entropy,
        )
        for i in range(0, flat_labels.numel(), ref.DEFAULT_CHUNK)
    ]
    if not outs:
        empty = logits.new_zeros(labels.shape, dtype=torch.float32)
        return LogprobsOutput(empty, empty.clone() if return_entropy else None)
    logp = torch.cat([o[0] for o in outs]).view(labels.shape)
    entropy = torch.cat([o[1] for o in outs]).view(labels.shape) if return_entropy else None
    return LogprobsOutput(logp, entropy)
