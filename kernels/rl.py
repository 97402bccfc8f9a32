"""RL kernels over (B, T) token grids: GAE, PPO policy / value losses, KL penalties. All math in fp32.

_gae_fwd_kernel            grid (cdiv(B, BLOCK_B),)
    Two affine scans per [BLOCK_B, BLOCK_T] tile, walking T from the end to the start and carrying the state of
    the tile to the right into the next one (any T, no power-of-two requirement). Each tile is loaded in reversed
    time order (column j holds t = T - 1 - (tile * BLOCK_T + j)), so the reverse recurrences become *forward*
    scans -- no ``tl.associative_scan(reverse=True)`` with a non-commutative combine, the pattern of an open
    Triton report of wrong GPU results (triton-lang/triton#4362):
      x_t = nv_{t+1} = (1 - m_{t+1}) x_{t+1} + m_{t+1} V_{t+1}     the next valid value (0 past the end)
      A_t = a_t A_{t+1} + b_t, a_t = m_t ? gamma lam : 1, b_t = m_t ? r_t + gamma x_t - V_t : 0
    reads r, V, m (V and m twice, the second time shifted by one: cache hits); writes A and returns = A + V.
    Bytes: (4 + 4 + 1) in + 8 out per token. With WHITEN_STATS it also writes the program's (n, mean, M2) of the
    valid advantages (re-reading its own output once, from L2).
_whiten_combine_kernel     grid (1,)      merges the per-program moments into (mean, rstd).
_whiten_apply_kernel       grid (cdiv(N, BLOCK),)   adv = (adv - mean) * rstd in place: 4 bytes in, 4 out.
_rl_loss_fwd_kernel        grid (B,)
    One row per program, T in tiles; reads current, old, target (logprobs, old_logprobs, advantages; or values,
    old_values, returns) and the mask. Per valid token: the PPO clipped surrogate (or the clipped value loss) l_t
    and its derivative g_t = dl_t / dcurrent_t, written unscaled in fp32; per row, at the ROW_* columns: sum l,
    n_b and the stat partials (clip counts, sum of old - new, ratio sum / min / max; value: clipped count, sum
    of V). Bytes: 3 * 4 + 1 in, 4 out per token (the loss needs no second read of the inputs in the backward).
_rl_loss_finalize_kernel   grid (1,)
    Reduces the (B, NUM_ROW_STATS) row partials to the loss and the stats with the aggregation mode, and writes the
    per-row gradient scale w_b (every agg mode is sum_bt m_bt w_b l_bt). No host synchronisation anywhere.
_rl_loss_bwd_kernel        grid (B, cdiv(T, BLOCK_T))
    grad_current[b, t] = g[b, t] * w_b * upstream: 4 bytes in, 2-4 bytes out per token.
_kl_fwd_kernel / _kl_bwd_kernel   grid (cdiv(N, BLOCK),)
    k1 / k2 / k3 of d = ref - logp and their derivatives; k3 and its derivative use a Taylor series for small
    |d| (exp(d) - 1 - d cancels catastrophically in fp32; libdevice expm1 is unavailable in the interpreter).

The launchers below (:func:`gae`, :func:`rl_loss_forward`, :func:`rl_loss_backward`, :func:`kl_forward`,
:func:`kl_backward`) allocate the outputs, pick the tiles and launch. Optional inputs and outputs are passed as
None; ``triton.heuristics`` turns each into its ``HAS_*`` / ``NEED_*`` flag.
"""
import torch
import triton
import triton.language as tl

from fastalign.kernels._common import cdiv, interpreting, kernel_mask, new_output, next_pow2, present
from fastalign.kernels._launch import on_input_device, tuned_config

# Module-level numbers a kernel reads are tl.constexpr (Triton refuses other globals); int(c) is the value.
# Columns of the (B, NUM_ROW_STATS) per-row partials of _rl_loss_fwd_kernel. Both losses: the loss sum and the
# valid-token count; the policy loss: clip counts, sum of (old - new), ratio sum / min / max; the value loss: the
# clipped-token count and the sum of the (valid) values, in the first two stat columns.
ROW_LOSS, ROW_COUNT = tl.constexpr(0), tl.constexpr(1)
ROW_CLIP_LOW, ROW_CLIP_HIGH, ROW_DUAL_CLIP, ROW_NEG_LOG_RATIO = (tl.constexpr(i) for i in (2, 3, 4, 5))
ROW_RATIO_SUM, ROW_RATIO_MIN, ROW_RATIO_MAX = (tl.constexpr(i) for i in (6, 7, 8))
ROW_VALUE_CLIPPED, ROW_VALUE_SUM = tl.constexpr(2), tl.constexpr(3)
NUM_ROW_STATS = tl.constexpr(9)
# Lengths of the finalize kernel's output: the loss, then the stats in the order of fastalign.reference.rl's
# POLICY_STATS (8) or VALUE_STATS (2).
NUM_POLICY_OUT, NUM_VALUE_OUT = 9, 3
# aggregation modes, in the order of fastalign.reference.rl.AGG_MODES (the C++ extension uses the same numbers)
AGG_TOKEN_MEAN, AGG_SEQ_SUM, AGG_SEQ_MEAN, AGG_SEQ_SUM_NORM = (tl.constexpr(i) for i in range(4))
# per-program moments of the valid advantages written by _gae_fwd_kernel (WHITEN_STATS), and the merged result
MOMENT_COUNT, MOMENT_MEAN, MOMENT_M2, NUM_MOMENTS = (tl.constexpr(i) for i in range(4))
WHITEN_MEAN, WHITEN_RSTD = tl.constexpr(0), tl.constexpr(1)
WHITEN_EPS = 1e-8  # as verl's masked_whiten and fastalign.reference.rl.masked_whiten
# KL estimators: KIND of _kl_fwd_kernel / _kl_bwd_kernel
KL_K1, KL_K2, KL_K3 = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
_KL_KINDS = {"k1": KL_K1.value, "k2": KL_K2.value, "k3": KL_K3.value}  # launch arguments: plain ints


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    # x_j = a_j x_{j-1} + b_j along the scan (j = reversed time): the composed map of the earlier positions, then
    # the later ones. A forward scan: the one order every Triton backend runs as written.
    return a_left * a_right, b_left * a_right + b_right


@triton.heuristics({"HAS_MASK": present("mask_ptr"), "WHITEN_STATS": present("moments_ptr")})
@triton.jit
def _gae_fwd_kernel(
    # data ptrs
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, returns_ptr, moments_ptr,
    # shapes
    B, T,
    # strides
    stride_r_b, stride_r_t, stride_v_b, stride_v_t, stride_m_b, stride_m_t, stride_out_b,
    # constants
    gamma, lam,
    HAS_MASK: tl.constexpr, WHITEN_STATS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_n = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float32)
    acc_sum = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float32)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = offs_b < B
    rows = offs_b.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    last_col = (offs_t == BLOCK_T - 1)[None, :]  # the earliest time of a tile: its state carries to the next
    next_value = tl.zeros([BLOCK_B], dtype=tl.float32)  # x at the earliest time of the tile to the right
    next_adv = tl.zeros([BLOCK_B], dtype=tl.float32)  # A at the earliest time of the tile to the right
    for tile in range(tl.cdiv(T, BLOCK_T)):
        # reversed time within and across tiles: tiles are full except the last, whose spare columns (t < 0) come
        # after every real one in scan order, so they cannot reach a stored value
        t = T - 1 - (tile * BLOCK_T + offs_t)
        io = bmask[:, None] & (t >= 0)[None, :]
        io_next = bmask[:, None] & ((t >= 0) & (t + 1 < T))[None, :]
        r = tl.load(rewards_ptr + rows[:, None] * stride_r_b + t[None, :] * stride_r_t, mask=io, other=0.0)
        v_ptrs = values_ptr + rows[:, None] * stride_v_b + t[None, :] * stride_v_t
        v = tl.load(v_ptrs, mask=io, other=0.0).to(tl.float32)
        v_next = tl.load(v_ptrs + stride_v_t, mask=io_next, other=0.0).to(tl.float32)
        if HAS_MASK:
            m_ptrs = mask_ptr + rows[:, None] * stride_m_b + t[None, :] * stride_m_t
            valid = tl.load(m_ptrs, mask=io, other=0) != 0
            # past the end counts as a valid position of value 0: nv starts at 0, as in the verl loop
            valid_next = tl.load(m_ptrs + stride_m_t, mask=io_next, other=1) != 0
        else:
            valid = io
            valid_next = io_next | ~io_next
        a_x = tl.where(valid_next, 0.0, 1.0)
        b_x = tl.where(valid_next, v_next, 0.0)
        prod_x, sum_x = tl.associative_scan((a_x, b_x), axis=1, combine_fn=_affine_combine)
        x = prod_x * next_value[:, None] + sum_x
        a_adv = tl.where(valid, gamma * lam, 1.0)
        b_adv = tl.where(valid, r.to(tl.float32) + gamma * x - v, 0.0)
        prod_a, sum_a = tl.associative_scan((a_adv, b_adv), axis=1, combine_fn=_affine_combine)
        adv = prod_a * next_adv[:, None] + sum_a
        next_value = tl.sum(tl.where(last_col, x, 0.0), axis=1)
        next_adv = tl.sum(tl.where(last_col, adv, 0.0), axis=1)
        out = rows[:, None] * stride_out_b + t[None, :]
        tl.store(adv_ptr + out, adv, mask=io)
        tl.store(returns_ptr + out, adv + v, mask=io)
        if WHITEN_STATS:
            acc_n += tl.where(valid & io, 1.0, 0.0)
            acc_sum += tl.where(valid & io, adv, 0.0)
    if WHITEN_STATS:
        # this program's (n, mean, M2) over its valid advantages, M2 about its own mean (no cancellation);
        # _whiten_combine_kernel merges them with Chan's formula. The second pass re-reads what this program
        # just wrote (L2 hits); the barrier makes other threads' stores visible.
        n = tl.sum(tl.sum(acc_n, axis=1), axis=0)
        mean = tl.sum(tl.sum(acc_sum, axis=1), axis=0) / tl.maximum(n, 1.0)
        tl.debug_barrier()
        acc_m2 = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            io = bmask[:, None] & (t < T)[None, :]
            if HAS_MASK:
                valid = tl.load(mask_ptr + rows[:, None] * stride_m_b + t[None, :] * stride_m_t, mask=io,
                                other=0) != 0
            else:
                valid = io
            adv = tl.load(adv_ptr + rows[:, None] * stride_out_b + t[None, :], mask=io, other=0.0)
            diff = tl.where(valid & io, adv - mean, 0.0)
            acc_m2 += diff * diff
        moments = moments_ptr + pid * NUM_MOMENTS
        tl.store(moments + MOMENT_COUNT, n)
        tl.store(moments + MOMENT_MEAN, mean)
        tl.store(moments + MOMENT_M2, tl.sum(tl.sum(acc_m2, axis=1), axis=0))


@triton.jit
def _whiten_combine_kernel(
    # data ptrs
    moments_ptr, out_ptr,
    # shapes
    P,
    # constants
    eps,
    BLOCK_P: tl.constexpr,
):
    """Merge the (n, mean, M2) of P programs (Chan et al.) into out = (mean, 1 / sqrt(var_unbiased + eps)); fewer
    than two valid elements: var = 0, as the reference."""
    offs = tl.arange(0, BLOCK_P)
    acc_n = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pm = p0 + offs < P
        moments = moments_ptr + (p0 + offs) * NUM_MOMENTS
        n_p = tl.load(moments + MOMENT_COUNT, mask=pm, other=0.0)
        acc_n += n_p
        acc_sum += n_p * tl.load(moments + MOMENT_MEAN, mask=pm, other=0.0)
    n = tl.sum(acc_n, axis=0)
    mean = tl.sum(acc_sum, axis=0) / tl.maximum(n, 1.0)
    acc_m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pm = p0 + offs < P
        moments = moments_ptr + (p0 + offs) * NUM_MOMENTS
        n_p = tl.load(moments + MOMENT_COUNT, mask=pm, other=0.0)
        delta = tl.load(moments + MOMENT_MEAN, mask=pm, other=0.0) - mean
        acc_m2 += tl.load(moments + MOMENT_M2, mask=pm, other=0.0) + n_p * delta * delta
    var = tl.where(n > 1, tl.sum(acc_m2, axis=0) / tl.maximum(n - 1.0, 1.0), 0.0)
    tl.store(out_ptr + WHITEN_MEAN, mean)
    tl.store(out_ptr + WHITEN_RSTD, tl.rsqrt(var + eps))


@triton.jit
def _whiten_apply_kernel(
    # data ptrs
    adv_ptr, stats_ptr,
    # shapes
    N,
    # constants
    BLOCK: tl.constexpr,
):
    """In place: adv = (adv - mean) * rstd over every element (valid or not), like verl's masked_whiten."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    nmask = offs < N
    mean = tl.load(stats_ptr + WHITEN_MEAN)
    rstd = tl.load(stats_ptr + WHITEN_RSTD)
    adv = tl.load(adv_ptr + offs, mask=nmask, other=0.0)
    tl.store(adv_ptr + offs, (adv - mean) * rstd, mask=nmask)


@triton.jit
def _policy_stat_identities(BLOCK: tl.constexpr):
    """Starting values of the policy stats' reductions, over tokens (forward) and over rows (finalize): 0 for the
    clip-low / clip-high / dual-clip counts and the (old - new) and ratio sums, +inf for the ratio min, -inf for
    its max."""
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    return (zero, zero, zero, zero, zero, tl.full([BLOCK], float("inf"), dtype=tl.float32),
            tl.full([BLOCK], float("-inf"), dtype=tl.float32))


@triton.heuristics({
    "HAS_MASK": present("mask_ptr"), "HAS_CLIP": present("clip_low"), "HAS_DUAL_CLIP": present("dual_clip"),
    "NEED_GRAD": present("grad_ptr"),
})
@triton.jit
def _rl_loss_fwd_kernel(
    # data ptrs
    current_ptr, old_ptr, target_ptr, mask_ptr, grad_ptr, row_stats_ptr,
    # shapes
    T,
    # strides
    stride_current_b, stride_current_t, stride_old_b, stride_old_t, stride_target_b, stride_target_t,
    stride_m_b, stride_m_t,
    # constants
    clip_low, clip_high, dual_clip,
    IS_VALUE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    NEED_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Policy: current = logprobs, old = old_logprobs, target = advantages (stride_target_t = 0 for per-sequence
    advantages). Value: current = values, old = old_values, target = returns; clip_low is the value clip."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_count = tl.zeros([BLOCK_T], dtype=tl.float32)
    if IS_VALUE:
        acc_clipped = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_values = tl.zeros([BLOCK_T], dtype=tl.float32)
    else:
        acc_clip_low, acc_clip_high, acc_dual, acc_neg_log_ratio, acc_ratio, min_ratio, max_ratio = (
            _policy_stat_identities(BLOCK_T))
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        tmask = t < T
        current = tl.load(current_ptr + row * stride_current_b + t * stride_current_t, mask=tmask,
                          other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * stride_old_b + t * stride_old_t, mask=tmask, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + row * stride_target_b + t * stride_target_t, mask=tmask,
                         other=0.0).to(tl.float32)
        if HAS_MASK:
            valid = tmask & (tl.load(mask_ptr + row * stride_m_b + t * stride_m_t, mask=tmask, other=0) != 0)
        else:
            valid = tmask
        if IS_VALUE:
            v = tl.where(valid, current, 0.0)
            err = v - tl.where(valid, target, 0.0)
            loss = 0.5 * err * err
            grad = err
            if HAS_CLIP:
                v_old = tl.where(valid, old, 0.0)
                v_clipped = v_old + tl.minimum(tl.maximum(v - v_old, -clip_low), clip_low)
                err_clipped = v_clipped - tl.where(valid, target, 0.0)
                loss_clipped = 0.5 * err_clipped * err_clipped
                clipped = loss_clipped > loss
                loss = tl.maximum(loss, loss_clipped)
                # inside the clip range old + (V - old) differs from V by rounding, so the "clipped" branch can win
                # by an ulp; it then has slope 1 like autograd's clamp, and slope 0 only when the clamp is active
                in_range = tl.abs(v - v_old) <= clip_low
                grad = tl.where(clipped, tl.where(in_range, err_clipped, 0.0), grad)
                acc_clipped += tl.where(valid & clipped, 1.0, 0.0)
            acc_values += v
        else:
            log_ratio = tl.where(valid, current - old, 0.0)
            adv = tl.where(valid, target, 0.0)
            ratio = tl.exp(log_ratio)
            loss_unclipped = -adv * ratio
            loss_clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
            loss = tl.maximum(loss_unclipped, loss_clipped)
            grad = tl.where(loss_clipped > loss_unclipped, 0.0, loss_unclipped)  # d(-A rho)/d logp = -A rho
            if HAS_DUAL_CLIP:
                loss_dual = -adv * dual_clip
                dual = (adv < 0) & (loss > loss_dual)
                loss = tl.where(dual, loss_dual, loss)
                grad = tl.where(dual, 0.0, grad)
                acc_dual += tl.where(valid & dual, 1.0, 0.0)
            acc_clip_low += tl.where(valid & (adv < 0) & (ratio < 1.0 - clip_low), 1.0, 0.0)
            acc_clip_high += tl.where(valid & (adv > 0) & (ratio > 1.0 + clip_high), 1.0, 0.0)
            acc_neg_log_ratio -= log_ratio
            acc_ratio += tl.where(valid, ratio, 0.0)
            min_ratio = tl.minimum(min_ratio, tl.where(valid, ratio, float("inf")))
            max_ratio = tl.maximum(max_ratio, tl.where(valid, ratio, float("-inf")))
        acc_loss += tl.where(valid, loss, 0.0)
        acc_count += tl.where(valid, 1.0, 0.0)
        if NEED_GRAD:
            tl.store(grad_ptr + row * T + t, tl.where(valid, grad, 0.0), mask=tmask)
    out = row_stats_ptr + row * NUM_ROW_STATS
    tl.store(out + ROW_LOSS, tl.sum(acc_loss, axis=0))
    tl.store(out + ROW_COUNT, tl.sum(acc_count, axis=0))
    if IS_VALUE:
        tl.store(out + ROW_VALUE_CLIPPED, tl.sum(acc_clipped, axis=0))
        tl.store(out + ROW_VALUE_SUM, tl.sum(acc_values, axis=0))
    else:
        tl.store(out + ROW_CLIP_LOW, tl.sum(acc_clip_low, axis=0))
        tl.store(out + ROW_CLIP_HIGH, tl.sum(acc_clip_high, axis=0))
        tl.store(out + ROW_DUAL_CLIP, tl.sum(acc_dual, axis=0))
        tl.store(out + ROW_NEG_LOG_RATIO, tl.sum(acc_neg_log_ratio, axis=0))
        tl.store(out + ROW_RATIO_SUM, tl.sum(acc_ratio, axis=0))
        tl.store(out + ROW_RATIO_MIN, tl.min(min_ratio, axis=0))
        tl.store(out + ROW_RATIO_MAX, tl.max(max_ratio, axis=0))


@triton.jit
def _rl_loss_finalize_kernel(
    # data ptrs
    row_stats_ptr, scale_ptr, out_ptr,
    # shapes
    B,
    # constants
    norm_len,
    AGG: tl.constexpr, IS_VALUE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """out (policy, NUM_POLICY_OUT): loss, clip_frac, clip_frac_low, clip_frac_high, dual_clip_frac, approx_kl,
    ratio mean / min / max. out (value, NUM_VALUE_OUT): loss, clip_frac, values_mean. scale: (B,) fp32 per-row
    gradient weights w_b."""
    offs = tl.arange(0, BLOCK_B)
    tot_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    tot_seq = tl.zeros([BLOCK_B], dtype=tl.float32)  # sum_b loss_b / max(n_b, 1)
    tot_count = tl.zeros([BLOCK_B], dtype=tl.float32)
    if IS_VALUE:
        tot_clipped = tl.zeros([BLOCK_B], dtype=tl.float32)
        tot_values = tl.zeros([BLOCK_B], dtype=tl.float32)
    else:
        tot_clip_low, tot_clip_high, tot_dual, tot_neg_log_ratio, tot_ratio, min_ratio, max_ratio = (
            _policy_stat_identities(BLOCK_B))
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs
        bmask = rows < B
        ptrs = row_stats_ptr + rows.to(tl.int64) * NUM_ROW_STATS
        loss_b = tl.load(ptrs + ROW_LOSS, mask=bmask, other=0.0)
        n_b = tl.load(ptrs + ROW_COUNT, mask=bmask, other=0.0)
        tot_loss += loss_b
        tot_seq += loss_b / tl.maximum(n_b, 1.0)
        tot_count += n_b
        if IS_VALUE:
            tot_clipped += tl.load(ptrs + ROW_VALUE_CLIPPED, mask=bmask, other=0.0)
            tot_values += tl.load(ptrs + ROW_VALUE_SUM, mask=bmask, other=0.0)
        else:
            tot_clip_low += tl.load(ptrs + ROW_CLIP_LOW, mask=bmask, other=0.0)
            tot_clip_high += tl.load(ptrs + ROW_CLIP_HIGH, mask=bmask, other=0.0)
            tot_dual += tl.load(ptrs + ROW_DUAL_CLIP, mask=bmask, other=0.0)
            tot_neg_log_ratio += tl.load(ptrs + ROW_NEG_LOG_RATIO, mask=bmask, other=0.0)
            tot_ratio += tl.load(ptrs + ROW_RATIO_SUM, mask=bmask, other=0.0)
            min_ratio = tl.minimum(min_ratio, tl.load(ptrs + ROW_RATIO_MIN, mask=bmask, other=float("inf")))
            max_ratio = tl.maximum(max_ratio, tl.load(ptrs + ROW_RATIO_MAX, mask=bmask, other=float("-inf")))
    n = tl.sum(tot_count, axis=0)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    if AGG == AGG_TOKEN_MEAN:
        loss = tl.sum(tot_loss, axis=0) * inv_n
    elif AGG == AGG_SEQ_SUM:
        loss = tl.sum(tot_loss, axis=0) / B
    elif AGG == AGG_SEQ_MEAN:
        loss = tl.sum(tot_seq, axis=0) / B
    else:
        loss = tl.sum(tot_loss, axis=0) / (B * norm_len)
    tl.store(out_ptr + 0, loss)
    if IS_VALUE:
        tl.store(out_ptr + 1, tl.sum(tot_clipped, axis=0) * inv_n)
        tl.store(out_ptr + 2, tl.sum(tot_values, axis=0) * inv_n)
    else:
        low = tl.sum(tot_clip_low, axis=0)
        high = tl.sum(tot_clip_high, axis=0)
        tl.store(out_ptr + 1, (low + high) * inv_n)
        tl.store(out_ptr + 2, low * inv_n)
        tl.store(out_ptr + 3, high * inv_n)
        tl.store(out_ptr + 4, tl.sum(tot_dual, axis=0) * inv_n)
        tl.store(out_ptr + 5, tl.sum(tot_neg_log_ratio, axis=0) * inv_n)
        tl.store(out_ptr + 6, tl.sum(tot_ratio, axis=0) * inv_n)
        tl.store(out_ptr + 7, tl.where(n > 0, tl.min(min_ratio, axis=0), 0.0))
        tl.store(out_ptr + 8, tl.where(n > 0, tl.max(max_ratio, axis=0), 0.0))
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + offs
        bmask = rows < B
        if AGG == AGG_TOKEN_MEAN:
            scale = tl.zeros([BLOCK_B], dtype=tl.float32) + inv_n
        elif AGG == AGG_SEQ_SUM:
            scale = tl.zeros([BLOCK_B], dtype=tl.float32) + 1.0 / B
        elif AGG == AGG_SEQ_MEAN:
            n_b = tl.load(row_stats_ptr + rows.to(tl.int64) * NUM_ROW_STATS + ROW_COUNT, mask=bmask, other=0.0)
            scale = 1.0 / (B * tl.maximum(n_b, 1.0))
        else:
            scale = tl.zeros([BLOCK_B], dtype=tl.float32) + 1.0 / (B * norm_len)
        tl.store(scale_ptr + rows, scale, mask=bmask)


@triton.jit
def _rl_loss_bwd_kernel(
    # data ptrs
    grad_ptr, scale_ptr, upstream_ptr, out_ptr,
    # shapes
    T,
    # constants
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    w = tl.load(scale_ptr + row) * tl.load(upstream_ptr)
    g = tl.load(grad_ptr + row * T + t, mask=tmask, other=0.0)
    tl.store(out_ptr + row * T + t, g * w, mask=tmask)


@triton.jit
def _expm1(d):
    # exp(d) - 1 loses all relative precision for small |d| in fp32; the series is exact to ~1e-9 below 0.1
    series = d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (1.0 / 720.0))))))
    return tl.where(tl.abs(d) < 0.1, series, tl.exp(d) - 1.0)


@triton.jit
def _k3(d):
    # exp(d) - 1 - d = d^2/2 + d^3/6 + ...: direct evaluation cancels for small |d|
    series = d * d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (1.0 / 720.0)))))
    return tl.where(tl.abs(d) < 0.1, series, tl.exp(d) - 1.0 - d)


@triton.jit
def _kl_fwd_kernel(
    # data ptrs
    logp_ptr, ref_ptr, out_ptr,
    # shapes
    N,
    # constants
    KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    nmask = offs < N
    d = (tl.load(ref_ptr + offs, mask=nmask, other=0.0).to(tl.float32)
         - tl.load(logp_ptr + offs, mask=nmask, other=0.0).to(tl.float32))
    if KIND == KL_K1:
        kl = -d
    elif KIND == KL_K2:
        kl = 0.5 * d * d
    else:
        kl = _k3(d)
    tl.store(out_ptr + offs, kl, mask=nmask)


@triton.heuristics({"NEED_LOGP": present("grad_logp_ptr"), "NEED_REF": present("grad_ref_ptr")})
@triton.jit
def _kl_bwd_kernel(
    # data ptrs
    logp_ptr, ref_ptr, upstream_ptr, grad_logp_ptr, grad_ref_ptr,
    # shapes
    N,
    # constants
    KIND: tl.constexpr, NEED_LOGP: tl.constexpr, NEED_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    """d kl / d logp = 1 (k1), -d (k2), -expm1(d) (k3); d kl / d ref is its negative."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    nmask = offs < N
    up = tl.load(upstream_ptr + offs, mask=nmask, other=0.0).to(tl.float32)
    if KIND == KL_K1:
        g = up
    else:
        d = (tl.load(ref_ptr + offs, mask=nmask, other=0.0).to(tl.float32)
             - tl.load(logp_ptr + offs, mask=nmask, other=0.0).to(tl.float32))
        if KIND == KL_K2:
            g = -d * up
        else:
            g = -_expm1(d) * up
    if NEED_LOGP:
        tl.store(grad_logp_ptr + offs, g, mask=nmask)
    if NEED_REF:
        tl.store(grad_ref_ptr + offs, -g, mask=nmask)


# --------------------------------------------------------------------------------------------------- launchers

# GPU launch configs; a card with an entry in kernels/configs/*.json uses its measured winner instead. BLOCK_T is
# capped at the next power of two above T.
_GPU_BLOCKS = {
    "gae": dict(BLOCK_B=2, BLOCK_T=1024, num_warps=4),
    "rl_loss": dict(BLOCK_T=2048, num_warps=8),
}


def _gae_blocks(batch: int, length: int, block_t: int | None, device: torch.device) -> dict:
    if interpreting():  # the interpreter pays per op, and custom-combine scans are slow: small tiles
        cap_t = 64 if block_t is None else block_t
        return dict(BLOCK_B=min(next_pow2(batch), 16), BLOCK_T=min(next_pow2(length), cap_t), num_warps=1)
    cfg = tuned_config(device, "gae", _GPU_BLOCKS["gae"])
    cfg["BLOCK_T"] = min(next_pow2(length), cfg["BLOCK_T"] if block_t is None else block_t)
    return cfg


def _elementwise_block() -> int:
    return 1024 if interpreting() else 2048


@on_input_device
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    gamma: float,
    lam: float,
    whiten: bool = False,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of :func:`fastalign.reference.rl.gae`, without gradients.

    Args:
        rewards, values: (B, T) fp16/bf16/fp32, any strides; mask: (B, T) bool or numeric (nonzero = valid), or None.
        block_t: the T tile (default: 64 in the interpreter, 1024 on the GPU).
    Returns:
        advantages (B, T), returns (B, T): fp32 contiguous.
    """
    batch, length = rewards.shape
    adv = new_output((batch, length), torch.float32, rewards.device)
    returns = new_output((batch, length), torch.float32, rewards.device)
    mask = kernel_mask(mask)
    cfg = _gae_blocks(batch, length, block_t, rewards.device)
    programs = cdiv(batch, cfg["BLOCK_B"])
    moments = new_output((programs, int(NUM_MOMENTS)), torch.float32, rewards.device) if whiten else None
    _gae_fwd_kernel[(programs,)](
        # data ptrs
        rewards, values, mask, adv, returns, moments,
        # shapes
        batch, length,
        # strides
        rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0, adv.stride(0),
        # constants
        gamma, lam,
        **cfg,
    )
    if whiten:  # two more launches, no host sync: merge the per-program moments, then scale in place
        stats = new_output((2,), torch.float32, rewards.device)  # WHITEN_MEAN, WHITEN_RSTD
        _whiten_combine_kernel[(1,)](moments, stats, programs, WHITEN_EPS, BLOCK_P=min(next_pow2(programs), 1024))
        block = _elementwise_block()
        _whiten_apply_kernel[(cdiv(adv.numel(), block),)](adv, stats, adv.numel(), BLOCK=block)
    return adv, returns


def _loss_blocks(length: int, device: torch.device) -> dict:
    if interpreting():
        return dict(BLOCK_T=min(next_pow2(length), 256), num_warps=1)
    if length <= 1024:  # a short row: one tile of next_pow2(T), fewer warps
        return dict(BLOCK_T=next_pow2(length), num_warps=4)
    cfg = tuned_config(device, "rl_loss", _GPU_BLOCKS["rl_loss"])
    cfg["BLOCK_T"] = min(next_pow2(length), cfg["BLOCK_T"])
    return cfg


@on_input_device
def rl_loss_forward(
    current: torch.Tensor,
    old: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    is_value: bool,
    clip_low: float | None,
    clip_high: float | None,
    dual_clip: float | None,
    agg: int,
    norm_len: float,
    need_grad: bool,
    block_t: int | None = None,
):
    """The PPO policy loss (``is_value=False``: current, old, target = logprobs, old_logprobs, advantages) or the
    clipped value loss (current, old, target = values, old_values, returns; ``clip_low`` is the value clip or None).

    Args:
        current, old: (B, T) fp16/bf16/fp32, any strides; target: (B, T), or (B,) per sequence (policy only);
        mask: (B, T) bool or numeric, or None; agg: one of the AGG_* numbers; norm_len: the length of
        "seq-mean-token-sum-norm".
    Returns:
        loss () fp32, stats (NUM_POLICY_OUT - 1 or NUM_VALUE_OUT - 1,) fp32, grad (B, T) fp32 unscaled or None,
        row scale (B,) fp32.
    """
    batch, length = current.shape
    device = current.device
    grad = new_output((batch, length), torch.float32, device) if need_grad else None
    row_stats = new_output((batch, int(NUM_ROW_STATS)), torch.float32, device)
    scale = new_output((batch,), torch.float32, device)
    out = new_output((NUM_VALUE_OUT if is_value else NUM_POLICY_OUT,), torch.float32, device)
    mask = kernel_mask(mask)
    cfg = _loss_blocks(length, device)
    if block_t is not None:
        cfg["BLOCK_T"] = block_t
    _rl_loss_fwd_kernel[(batch,)](
        # data ptrs
        current, old, target, mask, grad, row_stats,
        # shapes
        length,
        # strides
        current.stride(0), current.stride(1), old.stride(0), old.stride(1),
        target.stride(0), target.stride(1) if target.dim() == 2 else 0,
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        # constants
        clip_low, clip_high, dual_clip,
        IS_VALUE=is_value, **cfg,
    )
    _rl_loss_finalize_kernel[(1,)](
        # data ptrs
        row_stats, scale, out,
        # shapes
        batch,
        # constants
        norm_len,
        AGG=agg, IS_VALUE=is_value, BLOCK_B=min(next_pow2(batch), 1024),
    )
    return out[0], out[1:], grad, scale


@on_input_device
def rl_loss_backward(grad: torch.Tensor, scale: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype):
    """grad_current[b, t] = grad[b, t] * scale[b] * upstream, in ``dtype``. upstream: (1,) fp32."""
    batch, length = grad.shape
    out = new_output((batch, length), dtype, grad.device)
    block_t = min(next_pow2(length), 256 if interpreting() else 1024)
    _rl_loss_bwd_kernel[(batch, cdiv(length, block_t))](
        grad, scale, upstream, out,
        length,
        BLOCK_T=block_t,
    )
    return out


@on_input_device
def kl_forward(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str) -> torch.Tensor:
    """The ``kind`` ("k1" | "k2" | "k3") estimator of contiguous (...) inputs, as fp32 (...)."""
    out = new_output(logprobs.shape, torch.float32, logprobs.device)
    n = logprobs.numel()
    block = _elementwise_block()
    _kl_fwd_kernel[(cdiv(n, block),)](logprobs, ref_logprobs, out, n, KIND=_KL_KINDS[kind], BLOCK=block)
    return out


@on_input_device
def kl_backward(logprobs, ref_logprobs, grad_out, *, kind: str, need_logp: bool, need_ref: bool):
    """Gradients (to logprobs, to ref_logprobs; None where not needed) in the inputs' dtypes. All contiguous."""
    grad_logp = new_output(logprobs.shape, logprobs.dtype, logprobs.device) if need_logp else None
    grad_ref = new_output(ref_logprobs.shape, ref_logprobs.dtype, ref_logprobs.device) if need_ref else None
    n = logprobs.numel()
    block = _elementwise_block()
    _kl_bwd_kernel[(cdiv(n, block),)](
        logprobs, ref_logprobs, grad_out, grad_logp, grad_ref,
        n,
        KIND=_KL_KINDS[kind], BLOCK=block,
    )
    return grad_logp, grad_ref
