"""Token log-probs from logits or straight from hidden states: launchers, autograd, public functions.

The building blocks :func:`prepare_head`, :func:`head_forward` and :func:`head_backward` are shared with the
fused losses (``linear_dpo_loss``, ``linear_policy_loss``): they run the forward once and feed any per-token
upstream gradient into the recompute pass, without an autograd graph over [N, V].
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from fastalign import _backend
from fastalign.ops._checks import positive
from fastalign.reference import logprobs as ref

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_TYPES = (torch.float16, torch.bfloat16, torch.float32)


class LogprobsOutput(NamedTuple):
    """logprobs: (...) fp32, 0 at ignored positions; entropy: (...) fp32 or None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


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


def validate_labels(labels: torch.Tensor, vocab: int, ignore_index: int, *, op: str) -> None:
    """Raise if any label is outside [0, vocab) and not ``ignore_index`` (one small reduction and host sync)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{op}: labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {first} "
            f"({int(bad.sum())} such labels)"
        )


def prepare_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    op: str = "linear_logprobs",
) -> Head:
    """Check shapes, dtypes, devices and label range; flatten tokens. Errors name the offending argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: hidden must be fp16/bf16/fp32/fp64, got {hidden.dtype}")
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
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = labels.reshape(n).long().contiguous()
    validate_labels(labels, weight.shape[0], ignore_index, op=op)
    return Head(hidden.reshape(n, hidden.shape[-1]), weight, bias, labels, temperature, softcap, ignore_index, shape)


# ----------------------------------------------------------------------------------------------- triton launchers

def _poison() -> bool:
    """FASTALIGN_POISON=1 fills kernel outputs with NaN before launch, so unwritten values show up in tests."""
    return os.environ.get("FASTALIGN_POISON", "0") not in ("", "0")


_GPU_BLOCKS = {
    "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=16),
    "bwd": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2, GROUP_N=8),
}
# the interpreter is bound by per-op overhead: fewer, wider tiles; one config (no autotune there)
_INTERPRETER_BLOCKS = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1, GROUP_N=2),
    "bwd": dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1, GROUP_N=4),
}


def _blocks(kind: str) -> dict:
    return dict((_INTERPRETER_BLOCKS if _backend.interpreting() else _GPU_BLOCKS)[kind])


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = _backend.interpreting() and dtype == torch.bfloat16
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if (dtype == torch.float32 or upcast) else "tf32")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _compact_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of valid rows first (stable), and their count as a device scalar: no host sync."""
    valid = labels != ignore_index
    row_idx = torch.argsort((~valid).to(torch.int8), stable=True)
    return row_idx, valid.sum().to(torch.int32).reshape(1)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_MIN_SPLITS = 8


def _triton_forward(head: Head, need_entropy: bool):
    from fastalign.kernels.logprobs import _linear_logprobs_fwd_kernel

    h, w, b = head.hidden, head.weight, head.bias
    n, d = h.shape
    v = w.shape[0]
    cfg = _blocks("fwd")
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    num_n = _cdiv(n, block_n)
    # at least _MIN_SPLITS splits (a group of row blocks x the splits fills the card with h blocks that fit in
    # L2), more when there are few row blocks; each split must own at least one vocab tile
    splits = max(1, min(_cdiv(v, block_v), max(_MIN_SPLITS, _cdiv(2 * _num_sms(h.device), num_n))))
    v_per_split = _cdiv(_cdiv(v, splits), block_v) * block_v
    splits = _cdiv(v, v_per_split)
    row_idx, count = _compact_rows(head.labels, head.ignore_index)
    fill = float("nan") if _poison() else 0.0
    m = torch.full((splits, n), fill, dtype=torch.float32, device=h.device)
    s = torch.full_like(m, fill)
    t = torch.full_like(m, fill) if need_entropy else m
    zy = torch.full((n,), fill, dtype=torch.float32, device=h.device)
    if n > 0:
        _linear_logprobs_fwd_kernel[(num_n * splits,)](
            h, w, b if b is not None else w, head.labels, row_idx, count,
            m, s, t, zy,
            n, d, v, v_per_split,
            h.stride(0), h.stride(1), w.stride(0), w.stride(1),
            1.0 / head.temperature, head.softcap or 1.0,
            HAS_BIAS=b is not None, HAS_SOFTCAP=head.softcap is not None, RETURN_ENTROPY=need_entropy,
            **_dot_flags(h.dtype), **cfg,
        )
    # combine the per-split partials of the compacted rows: O(splits * N) work, negligible next to the GEMM
    valid_pos = torch.arange(n, device=h.device) < count
    big_m = m.max(0).values
    big_m = torch.where(valid_pos, big_m, 0.0)
    scale = torch.exp(m - big_m)
    total = (s * scale).sum(0)
    lse_c = torch.where(valid_pos, big_m + torch.log(total), 0.0)
    logp_c = torch.where(valid_pos, zy - lse_c, 0.0)
    logp = torch.zeros(n, dtype=torch.float32, device=h.device).index_put_((row_idx,), logp_c)
    lse = torch.zeros_like(logp).index_put_((row_idx,), lse_c)
    mu = entropy = None
    if need_entropy:
        mu_c = torch.where(valid_pos, (t * scale).sum(0) / total, 0.0)
        mu = torch.zeros_like(logp).index_put_((row_idx,), mu_c)
        entropy = lse - mu
    return logp, entropy, lse, mu


# Backward workspace budget: the [N, V_chunk] dz buffer (gemm mode) or the fp32 dW chunk (atomic mode).
_CHUNK_BYTES = 256 * 2**20
BWD_MODES = ("gemm", "atomic")


def _bwd_mode() -> str:
    mode = os.environ.get("FASTALIGN_LOGPROBS_BWD", "gemm").strip().lower()
    if mode not in BWD_MODES:
        raise ValueError(f"FASTALIGN_LOGPROBS_BWD must be one of {BWD_MODES}, got {mode!r}")
    return mode


_ADDMM_OUT_DTYPE_OK: dict = {}


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows_per_step: int = 8192) -> None:
    """acc (fp32) += a @ b for half-precision a, b, accumulating in fp32 without an [M, N] half-precision copy.

    Uses cuBLAS with an fp32 output when this torch has ``addmm(..., out_dtype=)`` (CUDA), else row blocks."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (acc.device.type, a.dtype)
    if _ADDMM_OUT_DTYPE_OK.get(key, acc.device.type == "cuda"):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE_OK[key] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE_OK[key] = False
    # CPU (tests, the interpreter): upcast, exact. CUDA without out_dtype: cuBLAS still accumulates each chunk
    # in fp32 and rounds its partial product once before the fp32 sum.
    upcast = acc.device.type != "cuda"
    b = b.float() if upcast else b
    for r in range(0, a.shape[0], rows_per_step):
        part = a[r:r + rows_per_step]
        acc[r:r + rows_per_step] += torch.mm(part.float() if upcast else part, b)


def _triton_backward(head: Head, lse, mu, grad_logp, grad_entropy, needs):
    from fastalign.kernels import logprobs as k

    h, w, b = head.hidden, head.weight, head.bias
    n, d = h.shape
    v = w.shape[0]
    need_dh, need_dw, need_db = needs
    need_db = need_db and b is not None
    mode = _bwd_mode()
    cfg = _blocks("bwd")
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_idx, count = _compact_rows(head.labels, head.ignore_index)
    dw_out = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
    db = torch.zeros(v, dtype=torch.float32, device=h.device) if need_db else None
    dh = torch.zeros((n, d), dtype=torch.float32, device=h.device) if need_dh else None
    if n == 0:
        if dw_out is not None:
            dw_out.zero_()
        return dh.to(h.dtype) if dh is not None else None, dw_out, db.to(b.dtype) if db is not None else None
    dummy = lse
    common = dict(
        HAS_BIAS=b is not None, HAS_SOFTCAP=head.softcap is not None,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None, COMPUTE_DB=need_db,
        **_dot_flags(h.dtype), **cfg,
    )
    inputs = (
        h, w, b if b is not None else w, head.labels, row_idx, count, lse, mu if mu is not None else dummy,
        grad_logp if grad_logp is not None else dummy, grad_entropy if grad_entropy is not None else dummy,
    )
    strides = (h.stride(0), h.stride(1), w.stride(0), w.stride(1))
    scalars = (1.0 / head.temperature, head.softcap or 1.0)
    if mode == "gemm":
        # one [N, chunk] buffer reused for every vocab chunk; ignored rows are never written, so they stay 0
        chunk = max(block_v, min(v, _CHUNK_BYTES // (n * h.element_size())) // block_v * block_v)
        dz = torch.zeros((n, min(chunk, v)), dtype=h.dtype, device=h.device)
        for v_start in range(0, v, chunk):
            v_chunk = min(chunk, v - v_start)
            dz_c = dz[:, :v_chunk]
            grid = (_cdiv(n, block_n) * _cdiv(v_chunk, block_v),)
            k._linear_logprobs_bwd_kernel[grid](
                *inputs, dz_c, dummy, dummy, db[v_start:] if db is not None else dummy,
                n, d, v_start, v_chunk, *strides, dz.stride(0), 0, 0, *scalars,
                WRITE_DZ=True, COMPUTE_DH=False, COMPUTE_DW=False, **common,
            )
            if need_dw:  # complete for this chunk: one fp32-accumulated GEMM, one rounding
                torch.mm(dz_c.T, h, out=dw_out[v_start:v_start + v_chunk])
            if need_dh:
                _addmm_fp32_(dh, dz_c, w[v_start:v_start + v_chunk])
    else:
        # fp32 weights accumulate straight into the output; others through a bounded fp32 chunk
        chunk = v if w.dtype == torch.float32 else max(block_v, (_CHUNK_BYTES // (4 * d)) // block_v * block_v)
        for v_start in range(0, v, chunk):
            v_chunk = min(chunk, v - v_start)
            dw = None
            if need_dw:
                if w.dtype == torch.float32:
                    dw = dw_out[v_start:v_start + v_chunk].zero_()
                else:
                    dw = torch.zeros((v_chunk, d), dtype=torch.float32, device=h.device)
            grid = (_cdiv(n, block_n) * _cdiv(v_chunk, block_v),)
            k._linear_logprobs_bwd_kernel[grid](
                *inputs, dummy, dh if dh is not None else dummy, dw if dw is not None else dummy,
                db[v_start:] if db is not None else dummy,
                n, d, v_start, v_chunk, *strides, 0,
                dh.stride(0) if dh is not None else 0, dw.stride(0) if dw is not None else 0, *scalars,
                WRITE_DZ=False, COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, **common,
            )
            if need_dw and w.dtype != torch.float32:
                dw_out[v_start:v_start + v_chunk].copy_(dw)
    return (
        dh.to(h.dtype) if dh is not None else None,
        dw_out,
        db.to(b.dtype) if db is not None else None,
    )


# ------------------------------------------------------------------------------------------- backend-generic core

def resolve_head_backend(backend: str, head: Head, *, op: str) -> str:
    name = _backend.resolve(backend, (head.hidden, head.weight, head.labels, head.bias), op=op)
    if name == "triton" and head.hidden.dtype not in _TRITON_TYPES:
        raise TypeError(f"{op}: backend='triton' supports fp16/bf16/fp32 hidden, got {head.hidden.dtype}")
    return name


def head_forward(head: Head, backend: str, *, need_entropy: bool):
    """Forward of one resolved backend. Returns (logp (N,), entropy (N,) or None, lse (N,), mu (N,) or None)."""
    if backend == "triton":
        return _triton_forward(head, need_entropy)
    return ref.linear_logprobs_forward(
        head.hidden, head.weight, head.labels, head.bias, temperature=head.temperature, softcap=head.softcap,
        ignore_index=head.ignore_index, need_entropy=need_entropy,
    )


def head_backward(head: Head, backend: str, lse, mu, grad_logp, grad_entropy, needs=(True, True, True)):
    """Gradients (dh (N, D), dW (V, D), db (V,)) for per-token upstream gradients ``grad_logp`` / ``grad_entropy``
    ((N,) float or None). Incoming gradients are made contiguous fp32 (fp64 for fp64 inputs) here."""
    acc = torch.float64 if head.hidden.dtype == torch.float64 else torch.float32
    grad_logp = grad_logp.to(acc).contiguous() if grad_logp is not None else None
    grad_entropy = grad_entropy.to(acc).contiguous() if grad_entropy is not None else None
    if backend == "triton":
        return _triton_backward(head, lse, mu, grad_logp, grad_entropy, needs)
    return ref.linear_logprobs_backward(
        head.hidden, head.weight, head.labels, head.bias, lse, mu, grad_logp, grad_entropy,
        temperature=head.temperature, softcap=head.softcap, ignore_index=head.ignore_index, needs=needs,
    )


class LinearLogprobsFunction(torch.autograd.Function):
    """Forward saves only O(N) statistics (lse, mu); backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: Head, backend: str, return_entropy: bool):
        head = head._replace(hidden=hidden, weight=weight, bias=bias)
        logp, entropy, lse, mu = head_forward(head, backend, need_entropy=return_entropy)
        ctx.head = head._replace(hidden=None, weight=None, bias=None)
        ctx.backend = backend
        ctx.save_for_backward(hidden, weight, bias, lse, mu)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, lse, mu = ctx.saved_tensors
        head = ctx.head._replace(hidden=hidden, weight=weight, bias=bias)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        dh, dw, db = head_backward(head, ctx.backend, lse, mu, grad_logp, grad_entropy, needs)
        return dh, dw, db, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> LogprobsOutput:
    """Per-token log-probs of ``labels`` (and entropy) from hidden states and the LM-head weight.

    Equal to::

        logits = hidden.float() @ weight.float().T + bias          # never materialized here
        logits = softcap * torch.tanh(logits / softcap)             # if softcap
        logp = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]

    with ``logp = 0`` (and zero gradient) where ``labels == ignore_index``.

    Args:
        hidden: (..., D) bf16/fp16/fp32 (fp64 on the torch backend) last hidden states.
        weight: (V, D) same dtype; the LM head (the embedding matrix for tied models).
        labels: (...) or (N,) integer target ids in [0, V), or ``ignore_index``.
        bias: (V,) optional LM-head bias.
        temperature: > 0, divides the (softcapped) logits, as samplers do.
        softcap: optional c > 0: logits -> c * tanh(logits / c) before temperature (Gemma-style).
        return_entropy: also return the entropy of each token's distribution (differentiable).
        backend: "auto" | "torch" | "triton" (see :mod:`fastalign._backend`).

    Returns:
        LogprobsOutput(logprobs (...) fp32, entropy (...) fp32 or None), shaped like ``hidden.shape[:-1]``.
    """
    head = prepare_head(
        hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, ignore_index=ignore_index
    )
    name = resolve_head_backend(backend, head, op="linear_logprobs")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (head.hidden, head.weight, head.bias)
    )
    if needs_grad:
        logp, entropy = LinearLogprobsFunction.apply(
            head.hidden, head.weight, head.bias, head, name, bool(return_entropy)
        )
    else:  # forward only: nothing saved beyond the outputs
        logp, entropy, _, _ = head_forward(head, name, need_entropy=bool(return_entropy))
    return LogprobsOutput(logp.view(head.shape), entropy.view(head.shape) if entropy is not None else None)


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
