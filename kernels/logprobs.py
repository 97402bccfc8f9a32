"""Token log-probs (and entropy) straight from hidden states and the LM-head weight.

Both kernels walk only the *valid* rows: the launcher compacts the row indices of non-ignored tokens into
``row_idx`` (on device, no host sync) and passes their count; row blocks past the count exit at once, so
ignored tokens cost no tile work.

_linear_logprobs_fwd_kernel  grid (cdiv(N, BLOCK_N) * SPLIT_V,), grouped: GROUP_N row blocks x SPLIT_V splits
    reads  hidden rows [BLOCK_N, D] once per vocab tile, weight [V/SPLIT_V, D] once per program
    writes per (split, row) online-softmax partials m, s (= sum e^(z-m)), t (= sum e^(z-m) z) and, from the
           split that holds the label, the target logit: O(SPLIT_V * N) floats, never [N, V].
    FLOPs  2 N D V.
_linear_logprobs_bwd_kernel  grid (cdiv(N, BLOCK_N) * cdiv(V_chunk, BLOCK_V),), grouped for L2 reuse
    recomputes a [BLOCK_N, BLOCK_V] logit tile (2 BLOCK_N BLOCK_V D FLOPs) and forms dz in fp32 from the saved
    lse / mu and the per-token upstream gradients. Then, with WRITE_DZ (the default "gemm" mode), writes dz in
    the inputs' dtype into an [N, V_chunk] buffer (2 N V_chunk bytes) that the launcher hands to two cuBLAS
    GEMMs (dW_chunk = dz^T h, dh += dz W_chunk); without it (the "atomic" mode), atomically adds dz @ W into
    an fp32 dh and dz^T @ h into an fp32 dW chunk — no buffer, but V / BLOCK_V atomic adds per dh element.
    Total 6 N D V FLOPs either way. See logprobs_notes.md.
Dots run on the inputs' dtype with fp32 accumulation; fp32 inputs use IEEE precision (no silent tf32); under
the interpreter bf16 operands are upcast to fp32 (its bf16 dot is wrong).

The launchers below (:func:`linear_logprobs_forward`, :func:`linear_logprobs_backward`) take the arguments of
their torch twins in :mod:`fastalign.reference.logprobs` and return the same values. Optional inputs and outputs
are passed as None; ``triton.heuristics`` turns each into its ``HAS_*`` / ``RETURN_*`` / ``COMPUTE_*`` flag.
"""
import os

import torch
import triton
import triton.language as tl

from fastalign.kernels._common import cdiv, interpreting, new_output, present


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable under the interpreter; this form is exact enough in fp32
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, rmask, offs_v, vmask,
    D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Raw logits a = h[rows] @ W[offs_v]^T (+ b) as an fp32 [BLOCK_N, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows[:, None] * stride_h_n + offs_d[None, :] * stride_h_d
    w_ptrs = w_ptr + offs_v[None, :] * stride_w_v + offs_d[:, None] * stride_w_d
    for d0 in range(0, D, BLOCK_D):
        dmask = (offs_d + d0) < D
        h = tl.load(h_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=vmask[None, :] & dmask[:, None], other=0.0)  # [BLOCK_D, BLOCK_V]
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_D * stride_h_d
        w_ptrs += BLOCK_D * stride_w_d
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=vmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _grouped_tile(pid, num_n, num_v, GROUP_N: tl.constexpr):
    # GROUP_N row blocks sweep the vocab tiles together, so their h and W tiles are reused from L2
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(num_n - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_n, (pid % per_group) // group_n


@triton.heuristics({
    "HAS_BIAS": present("b_ptr"), "HAS_SOFTCAP": present("softcap"), "RETURN_ENTROPY": present("t_ptr"),
})
@triton.jit
def _linear_logprobs_fwd_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, labels_ptr, row_idx_ptr, count_ptr,
    m_ptr, s_ptr, t_ptr, zy_ptr,
    # shapes
    N, D, V, V_PER_SPLIT,
    # strides
    stride_h_n, stride_h_d, stride_w_v, stride_w_d,
    # constants
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # GROUP_N row blocks x all splits run together: each keeps its h block hot in L2 while the splits'
    # weight tiles stream through once per group, not once per row block
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0) // tl.cdiv(N, BLOCK_N),
                                 GROUP_N)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N >= count:
        return
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = offs_r < count
    rows = tl.load(row_idx_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    v_begin = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # -inf, never 0: logits can all be negative
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        vmask = offs_v < v_end
        z = _logit_tile(
            h_ptr, w_ptr, b_ptr, rows, rmask, offs_v, vmask,
            D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
            HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = z * inv_temperature
        zy += tl.sum(tl.where(offs_v[None, :] == label[:, None], z, 0.0), axis=1)
        z = tl.where(vmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        if RETURN_ENTROPY:
            t = t * alpha + tl.sum(p * tl.where(vmask[None, :], z, 0.0), axis=1)
        m = m_new

    part = pid_s * N + offs_r
    tl.store(m_ptr + part, m, mask=rmask)
    tl.store(s_ptr + part, s, mask=rmask)
    if RETURN_ENTROPY:
        tl.store(t_ptr + part, t, mask=rmask)
    tl.store(zy_ptr + offs_r, zy, mask=rmask & (label >= v_begin) & (label < v_end))


@triton.jit
def _grad_logit_tile(
    h_ptr, w_ptr, b_ptr, labels_ptr, row_idx_ptr, lse_ptr, mu_ptr, g_ptr, e_ptr,
    pid_n, offs_v, vmask, count,
    D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Recompute one logit tile and return (rows, rmask, da) with da = dLoss/d(raw logit) in fp32, 0 off-range."""
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = offs_r < count
    rows = tl.load(row_idx_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    a = _logit_tile(
        h_ptr, w_ptr, b_ptr, rows, rmask, offs_v, vmask,
        D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
        HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    if HAS_SOFTCAP:
        tanh_a = _tanh(a / softcap)
        z = softcap * tanh_a * inv_temperature
    else:
        z = a * inv_temperature
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    tile_mask = rmask[:, None] & vmask[None, :]
    p = tl.where(tile_mask, tl.exp(z - lse[:, None]), 0.0)
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        # (1[j = y] - p) in fp32: the true-class term cancels badly in half precision
        dz += g[:, None] * (tl.where(offs_v[None, :] == label[:, None], 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        e = tl.load(e_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + rows, mask=rmask, other=0.0)
        # -e p (z - mu), not -e p (log p + H): the latter is 0 * -inf = NaN where p underflows
        dz -= e[:, None] * p * (z - mu[:, None])
    da = dz * inv_temperature
    if HAS_SOFTCAP:
        da = da * (1.0 - tanh_a * tanh_a)
    return rows, rmask, tl.where(tile_mask, da, 0.0)


@triton.heuristics({
    "HAS_BIAS": present("b_ptr"), "HAS_SOFTCAP": present("softcap"), "HAS_GRAD_LOGP": present("g_ptr"),
    "HAS_GRAD_ENTROPY": present("e_ptr"), "WRITE_DZ": present("dz_ptr"), "COMPUTE_DH": present("dh_ptr"),
    "COMPUTE_DW": present("dw_ptr"), "COMPUTE_DB": present("db_ptr"),
})
@triton.jit
def _linear_logprobs_bwd_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, labels_ptr, row_idx_ptr, count_ptr,
    lse_ptr, mu_ptr, g_ptr, e_ptr,
    dz_ptr, dh_ptr, dw_ptr, db_ptr,
    # shapes
    N, D, V_START, V_CHUNK,
    # strides
    stride_h_n, stride_h_d, stride_w_v, stride_w_d, stride_dz_n, stride_dh_n, stride_dw_v,
    # constants
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, WRITE_DZ: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Backward over one vocab chunk [V_START, V_START + V_CHUNK).

    WRITE_DZ (the GEMM-epilogue mode): store da in the inputs' dtype into an [N, V_CHUNK] buffer (rows in their
    original order; ignored rows are never written) for cuBLAS to form dW_chunk = da^T h and dh += da W_chunk.
    Otherwise (the fully fused mode): atomically add da @ W into an fp32 dh and da^T @ h into an fp32 dW chunk.
    """
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V_CHUNK, BLOCK_V), GROUP_N)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N >= count:
        return
    offs_v = V_START + pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    vmask = offs_v < V_START + V_CHUNK
    rows, rmask, da = _grad_logit_tile(
        h_ptr, w_ptr, b_ptr, labels_ptr, row_idx_ptr, lse_ptr, mu_ptr, g_ptr, e_ptr,
        pid_n, offs_v, vmask, count,
        D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
        inv_temperature, softcap,
        HAS_BIAS, HAS_SOFTCAP, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, UPCAST, DOT_PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_D,
    )
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + (offs_v - V_START), tl.sum(da, axis=0), mask=vmask)
    if WRITE_DZ:
        tl.store(
            dz_ptr + rows[:, None] * stride_dz_n + (offs_v - V_START)[None, :],
            da.to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & vmask[None, :],
        )
    else:
        if UPCAST:
            da_dot = da
        else:
            da_dot = da.to(h_ptr.dtype.element_ty)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dmask = (offs_d + d0) < D
            if COMPUTE_DH:
                w = tl.load(
                    w_ptr + offs_v[:, None] * stride_w_v + (d0 + offs_d)[None, :] * stride_w_d,
                    mask=vmask[:, None] & dmask[None, :], other=0.0,
                )
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(da_dot, w, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
                tl.atomic_add(
                    dh_ptr + rows[:, None] * stride_dh_n + (d0 + offs_d)[None, :], dh,
                    mask=rmask[:, None] & dmask[None, :],
                )
            if COMPUTE_DW:
                h = tl.load(
                    h_ptr + rows[:, None] * stride_h_n + (d0 + offs_d)[None, :] * stride_h_d,
                    mask=rmask[:, None] & dmask[None, :], other=0.0,
                )
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(da_dot), h, input_precision=DOT_PRECISION)  # [BLOCK_V, BLOCK_D]
                tl.atomic_add(
                    dw_ptr + (offs_v - V_START)[:, None] * stride_dw_v + (d0 + offs_d)[None, :], dw,
                    mask=vmask[:, None] & dmask[None, :],
                )


# --------------------------------------------------------------------------------------------------- launchers

_GPU_BLOCKS = {
    "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=16),
    "bwd": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=2, GROUP_N=8),
}
# the interpreter is bound by per-op overhead: fewer, wider tiles; one config (no autotune there)
_INTERPRETER_BLOCKS = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1, GROUP_N=2),
    "bwd": dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1, GROUP_N=4),
}
# at least this many vocabulary splits in the forward: a group of row blocks x the splits fills the card with
# h blocks that fit in L2
_MIN_SPLITS = 8
# Backward workspace budget: the [N, V_chunk] dz buffer (gemm mode) or the fp32 dW chunk (atomic mode).
_CHUNK_BYTES = 256 * 2**20
BWD_MODES = ("gemm", "atomic")


def _blocks(kind: str) -> dict:
    return dict((_INTERPRETER_BLOCKS if interpreting() else _GPU_BLOCKS)[kind])


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = interpreting() and dtype == torch.bfloat16
    return dict(UPCAST=upcast, DOT_PRECISION="ieee" if (dtype == torch.float32 or upcast) else "tf32")


def _compact_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of valid rows first (stable), and their count as a device scalar: no host sync."""
    valid = labels != ignore_index
    row_idx = torch.argsort((~valid).to(torch.int8), stable=True)
    return row_idx, valid.sum().to(torch.int32).reshape(1)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _bwd_mode() -> str:
    mode = os.environ.get("FASTALIGN_LOGPROBS_BWD", "gemm").strip().lower()
    if mode not in BWD_MODES:
        raise ValueError(f"FASTALIGN_LOGPROBS_BWD must be one of {BWD_MODES}, got {mode!r}")
    return mode


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    need_entropy: bool,
):
    """The Triton twin of :func:`fastalign.reference.logprobs.linear_logprobs_forward`.

    Args:
        hidden: (N, D) fp16/bf16/fp32, any strides; weight: (V, D) same dtype; labels: (N,) int64 contiguous;
        bias: (V,) or None.
    Returns:
        logp (N,), entropy (N,) or None, lse (N,), mu (N,) or None: fp32, 0 at ignored rows.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = _blocks("fwd")
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    num_n = cdiv(n, block_n)
    # at least _MIN_SPLITS splits, more when there are few row blocks; each split owns at least one vocab tile
    splits = max(1, min(cdiv(v, block_v), max(_MIN_SPLITS, cdiv(2 * _num_sms(hidden.device), num_n))))
    v_per_split = cdiv(cdiv(v, splits), block_v) * block_v
    splits = cdiv(v, v_per_split)
    row_idx, count = _compact_rows(labels, ignore_index)
    m = new_output((splits, n), torch.float32, hidden.device, fill=0.0)
    s = new_output((splits, n), torch.float32, hidden.device, fill=0.0)
    t = new_output((splits, n), torch.float32, hidden.device, fill=0.0) if need_entropy else None
    zy = new_output((n,), torch.float32, hidden.device, fill=0.0)
    if n > 0:
        _linear_logprobs_fwd_kernel[(num_n * splits,)](
            # data ptrs
            hidden, weight, bias, labels, row_idx, count,
            m, s, t, zy,
            # shapes
            n, d, v, v_per_split,
            # strides
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            # constants
            1.0 / temperature, softcap,
            **_dot_flags(hidden.dtype), **cfg,
        )
    # combine the per-split partials of the compacted rows: O(splits * N) work, negligible next to the GEMM
    valid_pos = torch.arange(n, device=hidden.device) < count
    big_m = m.max(0).values
    big_m = torch.where(valid_pos, big_m, 0.0)
    scale = torch.exp(m - big_m)
    total = (s * scale).sum(0)
    lse_c = torch.where(valid_pos, big_m + torch.log(total), 0.0)
    logp_c = torch.where(valid_pos, zy - lse_c, 0.0)
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_put_((row_idx,), logp_c)
    lse = torch.zeros_like(logp).index_put_((row_idx,), lse_c)
    mu = entropy = None
    if need_entropy:
        mu_c = torch.where(valid_pos, (t * scale).sum(0) / total, 0.0)
        mu = torch.zeros_like(logp).index_put_((row_idx,), mu_c)
        entropy = lse - mu
    return logp, entropy, lse, mu


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


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    mu: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    needs: tuple[bool, bool, bool] = (True, True, True),
):
    """The Triton twin of :func:`fastalign.reference.logprobs.linear_logprobs_backward`.

    Args:
        lse, mu: (N,) fp32 from :func:`linear_logprobs_forward`; grad_logp, grad_entropy: (N,) fp32 contiguous or
        None; needs: which of (d hidden, d weight, d bias) to compute.
    Returns:
        (dh (N, D), dW (V, D), db (V,)) in the inputs' dtype, accumulated in fp32; None where not needed.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    need_db = need_db and bias is not None
    mode = _bwd_mode()
    cfg = _blocks("bwd")
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_idx, count = _compact_rows(labels, ignore_index)
    dw_out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_dw else None
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_db else None
    dh = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if need_dh else None
    if n == 0:
        if dw_out is not None:
            dw_out.zero_()
        return dh.to(hidden.dtype) if dh is not None else None, dw_out, db.to(bias.dtype) if db is not None else None
    inputs = (hidden, weight, bias, labels, row_idx, count, lse, mu, grad_logp, grad_entropy)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    scalars = (1.0 / temperature, softcap)
    flags = dict(**_dot_flags(hidden.dtype), **cfg)
    if mode == "gemm":
        # one [N, chunk] buffer reused for every vocab chunk; ignored rows are never written, so they stay 0
        chunk = max(block_v, min(v, _CHUNK_BYTES // (n * hidden.element_size())) // block_v * block_v)
        dz = torch.zeros((n, min(chunk, v)), dtype=hidden.dtype, device=hidden.device)
        for v_start in range(0, v, chunk):
            v_chunk = min(chunk, v - v_start)
            dz_c = dz[:, :v_chunk]
            grid = (cdiv(n, block_n) * cdiv(v_chunk, block_v),)
            _linear_logprobs_bwd_kernel[grid](
                # data ptrs
                *inputs, dz_c, None, None, db[v_start:] if db is not None else None,
                # shapes
                n, d, v_start, v_chunk,
                # strides
                *strides, dz.stride(0), 0, 0,
                # constants
                *scalars, **flags,
            )
            if need_dw:  # complete for this chunk: one fp32-accumulated GEMM, one rounding
                torch.mm(dz_c.T, hidden, out=dw_out[v_start:v_start + v_chunk])
            if need_dh:
                _addmm_fp32_(dh, dz_c, weight[v_start:v_start + v_chunk])
    else:
        # fp32 weights accumulate straight into the output; others through a bounded fp32 chunk
        fp32_weight = weight.dtype == torch.float32
        chunk = v if fp32_weight else max(block_v, (_CHUNK_BYTES // (4 * d)) // block_v * block_v)
        for v_start in range(0, v, chunk):
            v_chunk = min(chunk, v - v_start)
            dw = None
            if need_dw:
                if fp32_weight:
                    dw = dw_out[v_start:v_start + v_chunk].zero_()
                else:
                    dw = torch.zeros((v_chunk, d), dtype=torch.float32, device=hidden.device)
            grid = (cdiv(n, block_n) * cdiv(v_chunk, block_v),)
            _linear_logprobs_bwd_kernel[grid](
                # data ptrs
                *inputs, None, dh, dw, db[v_start:] if db is not None else None,
                # shapes
                n, d, v_start, v_chunk,
                # strides
                *strides, 0, dh.stride(0) if dh is not None else 0, dw.stride(0) if dw is not None else 0,
                # constants
                *scalars, **flags,
            )
            if need_dw and not fp32_weight:
                dw_out[v_start:v_start + v_chunk].copy_(dw)
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw_out,
        db.to(bias.dtype) if db is not None else None,
    )
