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
"""
import triton
import triton.language as tl


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
