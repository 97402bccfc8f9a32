"""Token log-probs (and entropy) straight from hidden states and the LM-head weight.

All kernels walk only the *valid* rows: the launcher compacts the row indices of non-ignored tokens into
``row_idx`` (on device, no host sync) and passes their count; row blocks past the count exit at once, so
ignored tokens cost no tile work.

_linear_logprobs_fwd_kernel  grid (cdiv(N, BLOCK_N) * SPLIT_V,), grouped: GROUP_N row blocks x SPLIT_V splits
    reads  hidden rows [BLOCK_N, D] once per vocab tile, weight [V/SPLIT_V, D] once per program
    writes per (split, row) online-softmax partials m, s (= sum e^(z-m)), t (= sum e^(z-m) z): O(SPLIT_V * N)
           floats, never [N, V]. One flattened loop over (vocab tile, D step), so the load pipeline runs on
           across vocabulary tiles and under the softmax epilogue. On request, from the same tiles (flags that
           compile out when not asked for): q (= sum e^(2(z-m)), for log sum p^2), the sum of z (the mean logit)
           and the first index of the maximum (top-1, the lowest index winning ties): one number more per
           (split, row) each.
    FLOPs  2 N D V.
_target_logit_kernel         grid (cdiv(N, BLOCK_N),)
    the label's logit of each valid row as a gathered dot product: reads 2 N D elements, writes N floats.
_linear_logprobs_bwd_kernel  grid (cdiv(N, BLOCK_N) * cdiv(V_chunk, BLOCK_V),), grouped for L2 reuse
    recomputes a [BLOCK_N, BLOCK_V] logit tile (2 BLOCK_N BLOCK_V D FLOPs) and forms dz in fp32 from the saved
    lse / mu and the per-token upstream gradients. Then, with WRITE_DZ (the default "gemm" mode), writes dz in
    the inputs' dtype into an [N, V_chunk] buffer (2 N V_chunk bytes) that the launcher hands to two cuBLAS
    GEMMs (dW_chunk = dz^T h, dh += dz W_chunk); without it (the "atomic" mode), adds dz @ W into an fp32 dh and
    dz^T @ h into an fp32 dW chunk with relaxed atomics — no buffer, but V / BLOCK_V atomic adds per dh element.
    Total 6 N D V FLOPs either way. See logprobs_notes.md.
Dots run on the inputs' dtype with fp32 accumulation; fp32 inputs follow ``torch.get_float32_matmul_precision()``
("highest": IEEE, else tf32; :func:`fastalign.kernels._launch.fp32_dot_precision`); under the interpreter bf16
operands are upcast to fp32 (its bf16 dot is wrong) and fp32 dots are IEEE.

The launchers below (:func:`linear_logprobs_forward`, :func:`linear_logprobs_backward`) take the arguments of
their torch twins in :mod:`fastalign.reference.logprobs` and return the same values. Optional inputs and outputs
are passed as None; ``triton.heuristics`` turns each into its ``HAS_*`` / ``RETURN_*`` / ``COMPUTE_*`` flag.
"""
import os

import torch
import triton
import triton.language as tl

from fastalign.kernels import _common
from fastalign.kernels._common import cdiv, interpreting, new_output, present
from fastalign.kernels._launch import fp32_dot_precision, on_input_device, tuned_config


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable under the interpreter; this form is exact enough in fp32
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dot_step(
    h_tile, w_tile, acc, d0, D, stride_h_d, stride_w_d,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """acc += h[:, d0:d0 + BLOCK_D] @ W[:, d0:d0 + BLOCK_D]^T from row-pointer tiles whose rows are all in bounds
    (h_tile [BLOCK_N, BLOCK_D], w_tile [BLOCK_D, BLOCK_V] at d = 0): only a ragged D needs a mask."""
    if EVEN_D:
        h = tl.load(h_tile + d0 * stride_h_d)
        w = tl.load(w_tile + d0 * stride_w_d)
    else:
        offs_d = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_tile + d0 * stride_h_d, mask=(offs_d < D)[None, :], other=0.0)
        w = tl.load(w_tile + d0 * stride_w_d, mask=(offs_d < D)[:, None], other=0.0)
    if UPCAST:
        h = h.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(h, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, offs_v, V,
    D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
    HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Raw logits a = h[rows] @ W[offs_v]^T (+ b) as an fp32 [BLOCK_N, BLOCK_V] tile. ``rows`` must be in bounds
    (the launchers point rows past the valid count at row 0); vocabulary rows past V are clamped to V - 1, so no
    load needs a row mask: the caller masks those columns."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    v_rows = tl.minimum(offs_v, V - 1).to(tl.int64)
    h_tile = h_ptr + rows[:, None] * stride_h_n + offs_d[None, :] * stride_h_d
    w_tile = w_ptr + v_rows[None, :] * stride_w_v + offs_d[:, None] * stride_w_d
    for d0 in range(0, D, BLOCK_D):
        acc = _dot_step(h_tile, w_tile, acc, d0, D, stride_h_d, stride_w_d, EVEN_D, UPCAST, DOT_PRECISION, BLOCK_D)
    if HAS_BIAS:
        acc += tl.load(b_ptr + v_rows).to(tl.float32)[None, :]
    return acc


@triton.jit
def _grouped_tile(pid, num_n, num_v, GROUP_N: tl.constexpr):
    # GROUP_N row blocks sweep the vocab tiles together, so their h and W tiles are reused from L2
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_n = tl.minimum(num_n - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_n, (pid % per_group) // group_n


def _even_d(args) -> bool:
    return args["D"] % args["BLOCK_D"] == 0


@triton.heuristics({
    "HAS_BIAS": present("b_ptr"), "HAS_SOFTCAP": present("softcap"), "HAS_LOGIT_SCALE": present("logit_scale"),
    "RETURN_ENTROPY": present("t_ptr"), "RETURN_SUM_SQ": present("q_ptr"), "RETURN_SUM_Z": present("zsum_ptr"),
    "RETURN_ARGMAX": present("argmax_ptr"), "EVEN_D": _even_d,
})
@triton.jit
def _linear_logprobs_fwd_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, row_idx_ptr, count_ptr,
    m_ptr, s_ptr, t_ptr, q_ptr, zsum_ptr, argmax_ptr,
    # shapes
    N, D, V, V_PER_SPLIT,
    # strides
    stride_h_n, stride_h_d, stride_w_v, stride_w_d,
    # constants
    inv_temperature, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr, RETURN_SUM_SQ: tl.constexpr, RETURN_SUM_Z: tl.constexpr,
    RETURN_ARGMAX: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    # rows past the count read row 0 (in bounds, never stored): the h loads need no row mask
    rows = tl.load(row_idx_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
    v_begin = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)
    cols = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    h_tile = h_ptr + rows[:, None] * stride_h_n + offs_d[None, :] * stride_h_d

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # -inf, never 0: logits can all be negative
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    argmax = tl.zeros((BLOCK_N,), dtype=tl.int32)
    # One loop over (vocab tile, D step) pairs instead of a D loop nested in a vocab loop: the software pipeline
    # then keeps NUM_STAGES loads in flight across vocab tiles, so the next tile's first h / W tiles arrive while
    # this tile's softmax epilogue runs (a nested loop drains the pipeline at every vocab tile).
    k_tiles = tl.cdiv(D, BLOCK_D)
    ki = k_tiles - 1
    v0 = v_begin - BLOCK_V
    w_rows = tl.minimum(v_begin + cols, V - 1).to(tl.int64)
    w_tile = w_ptr + offs_d[:, None] * stride_w_d + w_rows[None, :] * stride_w_v
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for _ in range(0, tl.cdiv(v_end - v_begin, BLOCK_V) * k_tiles):
        ki = tl.where(ki == k_tiles - 1, 0, ki + 1)
        if ki == 0:
            v0 += BLOCK_V
            # vocabulary rows past V are clamped to V - 1 (loads in bounds, no mask); their columns are masked below
            w_rows = tl.minimum(v0 + cols, V - 1).to(tl.int64)
            w_tile = w_ptr + offs_d[:, None] * stride_w_d + w_rows[None, :] * stride_w_v
        acc = _dot_step(h_tile, w_tile, acc, ki * BLOCK_D, D, stride_h_d, stride_w_d, EVEN_D, UPCAST, DOT_PRECISION,
                        BLOCK_D)
        if ki == k_tiles - 1:
            z = acc
            if HAS_BIAS:
                z += tl.load(b_ptr + tl.minimum(v0 + cols, V - 1)).to(tl.float32)[None, :]
            if HAS_LOGIT_SCALE:
                z = z * logit_scale
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = z * inv_temperature
            in_split = (cols < v_end - v0)[None, :]
            if RETURN_SUM_Z:
                zsum += tl.sum(tl.where(in_split, z, 0.0), axis=1)
            z = tl.where(in_split, z, float("-inf"))
            tile_max = tl.max(z, axis=1)
            if RETURN_ARGMAX:
                # the first index of the maximum: a later tile takes over only with a strictly larger logit
                tile_arg = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int32) + v0
                argmax = tl.where(tile_max > m, tile_arg, argmax)
            m_new = tl.maximum(m, tile_max)
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            if RETURN_ENTROPY:
                t = t * alpha + tl.sum(p * tl.where(in_split, z, 0.0), axis=1)
            if RETURN_SUM_SQ:
                q = q * (alpha * alpha) + tl.sum(p * p, axis=1)
            m = m_new
            acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)

    part = pid_s * N + offs_r
    tl.store(m_ptr + part, m, mask=rmask)
    tl.store(s_ptr + part, s, mask=rmask)
    if RETURN_ENTROPY:
        tl.store(t_ptr + part, t, mask=rmask)
    if RETURN_SUM_SQ:
        tl.store(q_ptr + part, q, mask=rmask)
    if RETURN_SUM_Z:
        tl.store(zsum_ptr + part, zsum, mask=rmask)
    if RETURN_ARGMAX:
        tl.store(argmax_ptr + part, argmax, mask=rmask)


@triton.heuristics({"HAS_BIAS": present("b_ptr"), "HAS_SOFTCAP": present("softcap"),
                    "HAS_LOGIT_SCALE": present("logit_scale")})
@triton.jit
def _target_logit_kernel(
    # data ptrs
    h_ptr, w_ptr, b_ptr, labels_ptr, row_idx_ptr, count_ptr, zy_ptr,
    # shapes
    D,
    # strides
    stride_h_n, stride_h_d, stride_w_v, stride_w_d,
    # constants
    inv_temperature, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """zy[i] = s(k (h[r] . W[y_r] + b[y_r])) / T for the compacted valid rows r = row_idx[i], i < count.

    The label's logit as a gathered dot product, apart from the tile loop: a [BLOCK_N, BLOCK_V] compare-and-select
    against the labels in the forward's epilogue held ~60 more registers a thread. Reads 2 D elements a row
    (2 N D bytes in half precision, under 1% of the forward's time)."""
    offs_i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    imask = offs_i < tl.load(count_ptr)
    rows = tl.load(row_idx_ptr + offs_i, mask=imask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + rows, mask=imask, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dmask = imask[:, None] & ((d0 + offs_d) < D)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h_n + (d0 + offs_d)[None, :] * stride_h_d, mask=dmask, other=0.0)
        w = tl.load(w_ptr + label[:, None] * stride_w_v + (d0 + offs_d)[None, :] * stride_w_d, mask=dmask, other=0.0)
        acc += h.to(tl.float32) * w.to(tl.float32)
    z = tl.sum(acc, axis=1)
    if HAS_BIAS:
        z += tl.load(b_ptr + label, mask=imask, other=0.0).to(tl.float32)
    if HAS_LOGIT_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    tl.store(zy_ptr + offs_i, z * inv_temperature, mask=imask)


@triton.jit
def _grad_logit_tile(
    h_ptr, w_ptr, b_ptr, labels_ptr, row_idx_ptr, lse_ptr, mu_ptr, g_ptr, e_ptr,
    pid_n, offs_v, v_stop, count,
    D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
    inv_temperature, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Recompute one logit tile (vocabulary rows ``offs_v`` (int32), valid below ``v_stop``) and return
    (rows, rmask, vmask, da) with da = dLoss/d(h W^T + b) in fp32, 0 off-range."""
    offs_r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = offs_r < count
    rows = tl.load(row_idx_ptr + offs_r, mask=rmask, other=0).to(tl.int64)  # past the count: row 0, in bounds
    label = tl.load(labels_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    vmask = offs_v < v_stop
    a = _logit_tile(
        h_ptr, w_ptr, b_ptr, rows, offs_v, v_stop,
        D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
        HAS_BIAS, EVEN_D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    if HAS_LOGIT_SCALE:
        a = a * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(a / softcap) * inv_temperature
    else:
        z = a * inv_temperature
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    tile_mask = rmask[:, None] & vmask[None, :]
    p = tl.exp(z - lse[:, None])
    # dz = g (1[j = y] - p) - e p (z - mu) = g 1[j = y] - p (g + e (z - mu)), in fp32 (the true-class term cancels
    # badly in half precision); -e p (z - mu), never -e p (log p + H): that is 0 * -inf = NaN where p underflows
    if HAS_GRAD_LOGP:
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if HAS_GRAD_ENTROPY:
            e = tl.load(e_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            mu = tl.load(mu_ptr + rows, mask=rmask, other=0.0)
            coef = g[:, None] + e[:, None] * (z - mu[:, None])
        else:
            coef = g[:, None]
        dz = tl.where(offs_v[None, :] == label[:, None], g[:, None], 0.0) - p * coef
    elif HAS_GRAD_ENTROPY:
        e = tl.load(e_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + rows, mask=rmask, other=0.0)
        dz = -p * (e[:, None] * (z - mu[:, None]))
    else:
        dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    da = dz * inv_temperature
    if HAS_SOFTCAP:
        # d(c tanh(a / c)) / da = 1 - tanh^2, with tanh = z / (c / T) recovered from z: keeping the tanh tile
        # alive next to z cost 64 more registers a thread (spills at 128 x 128)
        tanh_a = z * (1.0 / (softcap * inv_temperature))
        da = da * (1.0 - tanh_a * tanh_a)
    if HAS_LOGIT_SCALE:
        da = da * logit_scale
    return rows, rmask, vmask, tl.where(tile_mask, da, 0.0)


@triton.heuristics({
    "HAS_BIAS": present("b_ptr"), "HAS_SOFTCAP": present("softcap"), "HAS_LOGIT_SCALE": present("logit_scale"),
    "HAS_GRAD_LOGP": present("g_ptr"),
    "HAS_GRAD_ENTROPY": present("e_ptr"), "WRITE_DZ": present("dz_ptr"), "COMPUTE_DH": present("dh_ptr"),
    "COMPUTE_DW": present("dw_ptr"), "COMPUTE_DB": present("db_ptr"), "EVEN_D": _even_d,
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
    inv_temperature, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, WRITE_DZ: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Backward over one vocab chunk [V_START, V_START + V_CHUNK).

    WRITE_DZ (the GEMM-epilogue mode): store da in the inputs' dtype into an [N, V_CHUNK] buffer (rows in their
    original order; ignored rows are never written) for cuBLAS to form dW_chunk = da^T h and dh += da W_chunk.
    Otherwise (the fully fused mode): atomically add da @ W into an fp32 dh and da^T @ h into an fp32 dW chunk.
    Every atomic is relaxed: the sums are read only after the kernel, so no ordering between them is needed (the
    default acq_rel puts a GPU-scope fence around each one).
    """
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V_CHUNK, BLOCK_V), GROUP_N)
    count = tl.load(count_ptr)
    if pid_n * BLOCK_N >= count:
        return
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # columns of the chunk, int32
    offs_v = V_START + offs_c
    rows, rmask, vmask, da = _grad_logit_tile(
        h_ptr, w_ptr, b_ptr, labels_ptr, row_idx_ptr, lse_ptr, mu_ptr, g_ptr, e_ptr,
        pid_n, offs_v, V_START + V_CHUNK, count,
        D, stride_h_n, stride_h_d, stride_w_v, stride_w_d,
        inv_temperature, softcap, logit_scale,
        HAS_BIAS, HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_GRAD_LOGP, HAS_GRAD_ENTROPY, EVEN_D, UPCAST, DOT_PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_D,
    )
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + offs_c, tl.sum(da, axis=0), mask=vmask, sem="relaxed")
    if WRITE_DZ:
        tl.store(
            dz_ptr + rows[:, None] * stride_dz_n + offs_c[None, :],
            da.to(dz_ptr.dtype.element_ty), mask=rmask[:, None] & vmask[None, :],
        )
    else:
        if UPCAST:
            da_dot = da
        else:
            da_dot = da.to(h_ptr.dtype.element_ty)
        offs_d = tl.arange(0, BLOCK_D)
        # da is 0 in masked rows and columns, so the clamped (in-bounds) W / h rows below contribute nothing
        w_rows = tl.minimum(offs_v, V_START + V_CHUNK - 1).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            dmask = (offs_d + d0) < D
            if COMPUTE_DH:
                w = tl.load(w_ptr + w_rows[:, None] * stride_w_v + (d0 + offs_d)[None, :] * stride_w_d,
                            mask=dmask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(da_dot, w, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
                tl.atomic_add(
                    dh_ptr + rows[:, None] * stride_dh_n + (d0 + offs_d)[None, :], dh,
                    mask=rmask[:, None] & dmask[None, :], sem="relaxed",
                )
            if COMPUTE_DW:
                h = tl.load(h_ptr + rows[:, None] * stride_h_n + (d0 + offs_d)[None, :] * stride_h_d,
                            mask=dmask[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(da_dot), h, input_precision=DOT_PRECISION)  # [BLOCK_V, BLOCK_D]
                tl.atomic_add(
                    dw_ptr + offs_c[:, None].to(tl.int64) * stride_dw_v + (d0 + offs_d)[None, :], dw,
                    mask=vmask[:, None] & dmask[None, :], sem="relaxed",
                )


# --------------------------------------------------------------------------------------------------- launchers

# Launch configs per direction and operand class, for an H100 / H200 (sm_90a; the numbers behind each choice are
# in logprobs_notes.md, *Compiled for sm_90a*). Half precision: a 128 x 128 tile on two warpgroups (wgmma
# m64n128k16); fp32 with tf32 dots the same tile with half the D step (the same shared memory a stage); fp32 with
# IEEE dots runs FFMA on a smaller tile that fits in registers. A card with an entry in kernels/configs/*.json
# (benchmarks/config_sweep.py writes them) uses its measured winner instead.
_GPU_BLOCKS = {
    "logprobs_fwd/half": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=16),
    "logprobs_fwd/fp32-tf32": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3, GROUP_N=16),
    "logprobs_fwd/fp32-ieee": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=3, GROUP_N=16),
    "logprobs_bwd/half": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=8),
    "logprobs_bwd/fp32-tf32": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3, GROUP_N=8),
    "logprobs_bwd/fp32-ieee": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2, GROUP_N=8),
}
# the label-logit gather (_target_logit_kernel): memory-bound, 2 D elements a row
_TARGET_BLOCKS = dict(BLOCK_N=16, BLOCK_D=256, num_warps=4)
# the interpreter is bound by per-op overhead: fewer, wider tiles; one config (no autotune there)
_INTERPRETER_BLOCKS = {
    "logprobs_fwd": dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1, GROUP_N=2),
    "logprobs_bwd": dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1, GROUP_N=4),
}
# at least this many vocabulary splits in the forward: a group of row blocks x the splits fills the card with
# h blocks that fit in L2
_MIN_SPLITS = 8
# The backward's workspace (the [N, V_chunk] dz buffer in gemm mode, the fp32 dW chunk in atomic mode) takes the
# head's memory budget (kernels/_common.head_memory_budget), bounded: each gemm-mode chunk re-reads and re-writes
# the fp32 [N, D] dh accumulator once, so fewer, larger chunks save N * D * 8 bytes each (0.94 GB at the target
# shape), but past _MAX_CHUNK_BYTES (5 chunks there) that is under 1% of the backward.
_FALLBACK_BUDGET = 2**30  # where kernels/_common has no head_memory_budget
_MAX_CHUNK_BYTES = 2 * 2**30
_MIN_CHUNK_COLS = 2048
BWD_MODES = ("gemm", "atomic")


def operand_class(dtype: torch.dtype) -> str:
    """The config class of an input dtype: "half" (bf16 / fp16), "fp32-tf32" or "fp32-ieee" (see
    :func:`fastalign.kernels._launch.fp32_dot_precision`)."""
    if dtype != torch.float32:
        return "half"
    return f"fp32-{fp32_dot_precision()}"


def _blocks(direction: str, dtype: torch.dtype, device: torch.device) -> dict:
    """The launch config of ``direction`` ("logprobs_fwd" | "logprobs_bwd") for inputs of ``dtype``."""
    if interpreting():
        return dict(_INTERPRETER_BLOCKS[direction])
    cls = operand_class(dtype)
    name = "bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else cls
    return tuned_config(device, f"{direction}/{name}", _GPU_BLOCKS[f"{direction}/{cls}"])


def _dot_flags(dtype: torch.dtype) -> dict:
    """UPCAST: the interpreter's bf16 dot is wrong, so it gets fp32 operands; DOT_PRECISION: half-precision dots
    accumulate in fp32 whatever the flag; fp32 dots follow torch's float32 matmul precision."""
    upcast = interpreting() and dtype == torch.bfloat16
    if dtype == torch.float32:
        precision = "ieee" if interpreting() else fp32_dot_precision()
    else:
        precision = "ieee" if upcast else "tf32"
    return dict(UPCAST=upcast, DOT_PRECISION=precision)


def _chunk_columns(n: int, v: int, bytes_per_column_row: int, block_v: int, device: torch.device,
                   budget: int | None = None) -> int:
    """Vocabulary columns of one backward chunk: the memory budget (the call's, else
    :func:`fastalign.kernels._common.head_memory_budget`) over the chunk's bytes per column (``bytes_per_column_row``
    times ``n`` rows), clamped to [_MIN_CHUNK_COLS, V] and a multiple of ``block_v``."""
    if budget is None:
        budget_fn = getattr(_common, "head_memory_budget", None)
        budget = budget_fn(device) if budget_fn is not None else _FALLBACK_BUDGET
    per_column = max(1, n * bytes_per_column_row)
    cols = min(budget, _MAX_CHUNK_BYTES) // per_column
    cols = max(_MIN_CHUNK_COLS, cols) // block_v * block_v
    return max(block_v, min(cols, cdiv(v, block_v) * block_v))


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


@on_input_device
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
    logit_scale: float = 1.0,
    stats: tuple[str, ...] = (),
):
    """The Triton twin of :func:`fastalign.reference.logprobs.linear_logprobs_forward`.

    Args:
        hidden: (N, D) fp16/bf16/fp32, any strides; weight: (V, D) same dtype; labels: (N,) int64 contiguous;
        bias: (V,) or None; stats: names among "mean_logits", "is_top1", "log_sum_sq_probs".
    Returns:
        logp (N,), entropy (N,) or None, lse (N,), mu (N,) or None: fp32, 0 at ignored rows; and a dict of the
        ``stats`` asked for ((N,) fp32, is_top1 bool; 0 / False at ignored rows).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = _blocks("logprobs_fwd", hidden.dtype, hidden.device)
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
    zy = new_output((n,), torch.float32, hidden.device, fill=0.0)  # indexed like row_idx (compacted)
    # per-split partials of the statistics, only when asked for (None compiles their accumulators out)
    q, zsum = (new_output((splits, n), torch.float32, hidden.device, fill=0.0) if name in stats else None
               for name in ("log_sum_sq_probs", "mean_logits"))
    argmax = None
    if "is_top1" in stats:  # integers cannot hold NaN: the poison is an index no row has
        argmax = torch.full((splits, n), -2**31 if _common.poisoning() else 0, dtype=torch.int32, device=hidden.device)
    scale_arg = None if logit_scale == 1.0 else logit_scale
    if n > 0:
        _linear_logprobs_fwd_kernel[(num_n * splits,)](
            # data ptrs
            hidden, weight, bias, row_idx, count,
            m, s, t, q, zsum, argmax,
            # shapes
            n, d, v, v_per_split,
            # strides
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            # constants
            1.0 / temperature, softcap, scale_arg,
            **_dot_flags(hidden.dtype), **cfg,
        )
        target = _TARGET_BLOCKS
        _target_logit_kernel[(cdiv(n, target["BLOCK_N"]),)](
            # data ptrs
            hidden, weight, bias, labels, row_idx, count, zy,
            # shapes
            d,
            # strides
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            # constants
            1.0 / temperature, softcap, scale_arg,
            **target,
        )
    # combine the per-split partials of the compacted rows: O(splits * N) work, negligible next to the GEMM
    valid_pos = torch.arange(n, device=hidden.device) < count
    big_m = m.max(0).values
    first_max_split = (m == big_m).to(torch.int8).argmax(0) if argmax is not None else None  # splits in V order
    big_m = torch.where(valid_pos, big_m, 0.0)
    scale = torch.exp(m - big_m)
    total = (s * scale).sum(0)
    lse_c = torch.where(valid_pos, big_m + torch.log(total), 0.0)
    # the label's logit is summed in another order than its tile's, so where p -> 1 the difference could come out an
    # ulp above 0: log-probabilities are <= 0
    logp_c = torch.where(valid_pos, torch.clamp_max(zy - lse_c, 0.0), 0.0)
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_put_((row_idx,), logp_c)
    lse = torch.zeros_like(logp).index_put_((row_idx,), lse_c)
    mu = entropy = None
    if need_entropy:
        mu_c = torch.where(valid_pos, (t * scale).sum(0) / total, 0.0)
        mu = torch.zeros_like(logp).index_put_((row_idx,), mu_c)
        entropy = lse - mu
    extras = {}
    scatter = lambda values: torch.zeros_like(values).index_put_((row_idx,), values)  # noqa: E731
    if zsum is not None:
        extras["mean_logits"] = scatter(torch.where(valid_pos, zsum.sum(0) / v, 0.0))
    if argmax is not None:
        # the first index of the maximum over the whole vocabulary: the first split holding the maximum, its index
        first = argmax.gather(0, first_max_split[None])[0]
        extras["is_top1"] = scatter((first.long() == labels[row_idx]) & valid_pos)
    if q is not None:
        # log sum_j p_j^2 = log sum_j e^(2 (z_j - M)) - 2 log sum_j e^(z_j - M), the splits rescaled to one M
        total_sq = (q * scale * scale).sum(0)
        extras["log_sum_sq_probs"] = scatter(torch.where(valid_pos, torch.log(total_sq) - 2 * torch.log(total), 0.0))
    return logp, entropy, lse, mu, extras


_ADDMM_FP32: dict = {}  # (device, dtype) -> whether torch.addmm(..., out_dtype=torch.float32) runs there
_warned_addmm = False


def addmm_fp32_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch adds a ``dtype`` product straight into an fp32 tensor with one cuBLAS call
    (``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)``, CUDA only). Checked once per device and dtype
    on a 1 x 1 product, not guessed from the torch version."""
    key = (str(device), dtype)
    if key not in _ADDMM_FP32:
        ok = False
        if device.type == "cuda":
            try:
                one = torch.ones((1, 1), dtype=dtype, device=device)
                acc = torch.zeros((1, 1), dtype=torch.float32, device=device)
                torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
                ok = True
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _ADDMM_FP32[key] = ok
    return _ADDMM_FP32[key]


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows_per_step: int = 8192) -> None:
    """acc (fp32) += a @ b for half-precision a, b, with every partial sum in fp32.

    One cuBLAS call with an fp32 output where :func:`addmm_fp32_supported`; otherwise the product of upcast row
    blocks in fp32 (half-precision values are exact in fp32, so only the fp32 accumulation rounds) -- never a
    half-precision partial product rounded before the sum. That fallback is the CPU path, and on CUDA a slower
    fp32 GEMM (tf32 under torch's "high" precision, which is exact for bf16 / fp16 operands), with one warning."""
    global _warned_addmm
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if addmm_fp32_supported(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    if acc.device.type == "cuda" and not _warned_addmm:
        _warned_addmm = True
        import warnings

        warnings.warn(
            f"fastalign: this torch ({torch.__version__}) has no addmm(..., out_dtype=torch.float32) for {a.dtype}; "
            "linear_logprobs' backward accumulates d hidden with fp32 GEMMs on upcast blocks (exact, slower)",
            RuntimeWarning, stacklevel=3,
        )
    b = b.float()
    for r in range(0, a.shape[0], rows_per_step):
        acc[r:r + rows_per_step].addmm_(a[r:r + rows_per_step].float(), b)


@on_input_device
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
    logit_scale: float = 1.0,
    memory_budget: int | None = None,
):
    """The Triton twin of :func:`fastalign.reference.logprobs.linear_logprobs_backward`; ``memory_budget``: bytes
    for the backward's workspace (None: :func:`fastalign.kernels._common.head_memory_budget`).

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
    cfg = _blocks("logprobs_bwd", hidden.dtype, hidden.device)
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
    scalars = (1.0 / temperature, softcap, None if logit_scale == 1.0 else logit_scale)
    flags = dict(**_dot_flags(hidden.dtype), **cfg)
    if mode == "gemm":
        # one [N, chunk] buffer reused for every vocab chunk; ignored rows are never written, so they stay 0
        chunk = _chunk_columns(n, v, hidden.element_size(), block_v, hidden.device, memory_budget)
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
        chunk = v if fp32_weight else _chunk_columns(d, v, 4, block_v, hidden.device, memory_budget)
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
