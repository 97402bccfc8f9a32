// CUDA GAE and PPO policy loss.
//
// gae_kernel: one warp per row, T in tiles of 32 * kElems; each lane owns kElems consecutive positions. The verl
// loop state (nv = next valid value, A = running advantage) evolves by affine maps x -> a x + b, so each tile is
// two warp-wide reverse scans of affine maps (first nv, then A, whose map needs nv), the state of the tile to the
// right carried in. Bytes: r, V, mask in, A and returns out, once each.
// ppo_fwd_kernel: one block per row; per-token loss and unscaled derivative, block-reduced row partials.
// ppo_finalize_kernel: one block; loss, stats, per-row gradient scale (no host synchronisation).
// ppo_bwd_kernel: grad * row_scale[b] * upstream.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_runtime.h>

#include "../common.h"
#include "rl.h"

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kElems = 8;  // positions per lane in the GAE tile
constexpr int kGaeWarps = 4;  // rows per GAE block
constexpr int kThreads = 256;  // PPO blocks

// (a, b) <- (a, b) o (a_right, b_right): apply the right map first, x -> a (a_right x + b_right) + b
template <typename acc_t>
__device__ __forceinline__ void compose(acc_t& a, acc_t& b, acc_t a_right, acc_t b_right) {
  b = a * b_right + b;
  a = a * a_right;
}

// Lane i ends with the composition of the maps of lanes i+1 .. 31 (identity on lane 31).
template <typename acc_t>
__device__ __forceinline__ void warp_reverse_exclusive_scan(acc_t& a, acc_t& b, int lane) {
  for (int d = 1; d < kWarp; d <<= 1) {
    const acc_t a_right = __shfl_down_sync(kFull, a, d);
    const acc_t b_right = __shfl_down_sync(kFull, b, d);
    if (lane + d < kWarp) compose(a, b, a_right, b_right);
  }
  acc_t a_ex = __shfl_down_sync(kFull, a, 1);
  acc_t b_ex = __shfl_down_sync(kFull, b, 1);
  a = lane == kWarp - 1 ? acc_t(1) : a_ex;
  b = lane == kWarp - 1 ? acc_t(0) : b_ex;
}

template <typename scalar_t, typename acc_t>
__global__ void gae_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
                           const bool* __restrict__ mask, acc_t* __restrict__ adv, acc_t* __restrict__ ret,
                           int64_t B, int64_t T, acc_t gamma, acc_t gamma_lam) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGaeWarps + threadIdx.x / kWarp;
  if (row >= B) return;  // the whole warp leaves together
  const int64_t base = row * T;
  constexpr int64_t kTile = kWarp * kElems;
  acc_t next_value = 0, run_adv = 0;  // loop state after the tile to the right
  const int64_t num_tiles = (T + kTile - 1) / kTile;
  for (int64_t tile = num_tiles - 1; tile >= 0; --tile) {
    const int64_t p0 = tile * kTile + lane * kElems;
    acc_t r[kElems], v[kElems];
    bool valid[kElems];
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
      const int64_t t = p0 + k;
      const bool in = t < T;
      r[k] = in ? static_cast<acc_t>(rewards[base + t]) : acc_t(0);
      v[k] = in ? static_cast<acc_t>(values[base + t]) : acc_t(0);
      valid[k] = in && (mask == nullptr || mask[base + t]);  // positions past T: identity maps
    }
    // scan 1: nv_t = valid ? V_t : nv_{t+1}
    acc_t a = 1, b = 0;
#pragma unroll
    for (int k = kElems - 1; k >= 0; --k) {
      const acc_t ak = valid[k] ? acc_t(0) : acc_t(1), bk = valid[k] ? v[k] : acc_t(0);
      b = ak * b + bk;  // (ak, bk) o (a, b)
      a = ak * a;
    }
    warp_reverse_exclusive_scan(a, b, lane);
    acc_t nv = a * next_value + b;  // nv after this lane's last position
    acc_t delta[kElems];
#pragma unroll
    for (int k = kElems - 1; k >= 0; --k) {
      delta[k] = r[k] + gamma * nv - v[k];
      nv = valid[k] ? v[k] : nv;
    }
    // scan 2: A_t = valid ? delta_t + gamma lam A_{t+1} : A_{t+1}
    a = 1;
    b = 0;
#pragma unroll
    for (int k = kElems - 1; k >= 0; --k) {
      const acc_t ak = valid[k] ? gamma_lam : acc_t(1), bk = valid[k] ? delta[k] : acc_t(0);
      b = ak * b + bk;
      a = ak * a;
    }
    warp_reverse_exclusive_scan(a, b, lane);
    acc_t run = a * run_adv + b;
#pragma unroll
    for (int k = kElems - 1; k >= 0; --k) {
      run = valid[k] ? delta[k] + gamma_lam * run : run;
      const int64_t t = p0 + k;
      if (t < T) {
        adv[base + t] = run;
        ret[base + t] = run + v[k];
      }
    }
    next_value = __shfl_sync(kFull, nv, 0);
    run_adv = __shfl_sync(kFull, run, 0);
  }
}

template <typename acc_t>
struct SumOp {
  __device__ __forceinline__ acc_t operator()(acc_t x, acc_t y) const { return x + y; }
};
template <typename acc_t>
struct MinOp {
  __device__ __forceinline__ acc_t operator()(acc_t x, acc_t y) const { return x < y ? x : y; }
};
template <typename acc_t>
struct MaxOp {
  __device__ __forceinline__ acc_t operator()(acc_t x, acc_t y) const { return x > y ? x : y; }
};

// Reduces v over the block; the result is meaningful in thread 0. smem holds one value per warp.
template <typename acc_t, typename Op>
__device__ acc_t block_reduce(acc_t v, Op op, acc_t* smem) {
  for (int d = kWarp / 2; d > 0; d >>= 1) v = op(v, __shfl_down_sync(kFull, v, d));
  __syncthreads();  // smem may still be read by the previous reduction
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < blockDim.x / kWarp; ++w) v = op(v, smem[w]);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void ppo_fwd_kernel(const scalar_t* __restrict__ logprobs, const scalar_t* __restrict__ old_logprobs,
                               const scalar_t* __restrict__ advantages, const bool* __restrict__ mask,
                               acc_t* __restrict__ grad, acc_t* __restrict__ row_stats, int64_t T,
                               int64_t adv_stride_b, int64_t adv_stride_t, acc_t lo, acc_t hi, acc_t dual,
                               bool has_dual) {
  __shared__ acc_t smem[kThreads / kWarp];
  const int64_t row = blockIdx.x;
  const acc_t inf = INFINITY;
  acc_t loss_sum = 0, n = 0, n_low = 0, n_high = 0, n_dual = 0, kl = 0, ratio_sum = 0, ratio_min = inf,
        ratio_max = -inf;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t i = row * T + t;
    if (mask != nullptr && !mask[i]) {
      if (grad != nullptr) grad[i] = acc_t(0);
      continue;
    }
    const acc_t log_ratio = static_cast<acc_t>(logprobs[i]) - static_cast<acc_t>(old_logprobs[i]);
    const acc_t a = static_cast<acc_t>(advantages[row * adv_stride_b + t * adv_stride_t]);
    const acc_t ratio = exp(log_ratio);
    const acc_t l_unclipped = -a * ratio;
    const acc_t l_clipped = -a * fmin(fmax(ratio, lo), hi);
    acc_t l = fmax(l_unclipped, l_clipped);
    acc_t d = l_clipped > l_unclipped ? acc_t(0) : l_unclipped;
    if (has_dual && a < 0 && l > -a * dual) {
      l = -a * dual;
      d = 0;
      n_dual += 1;
    }
    if (grad != nullptr) grad[i] = d;
    loss_sum += l;
    n += 1;
    n_low += (a < 0 && ratio < lo) ? 1 : 0;
    n_high += (a > 0 && ratio > hi) ? 1 : 0;
    kl -= log_ratio;
    ratio_sum += ratio;
    ratio_min = fmin(ratio_min, ratio);
    ratio_max = fmax(ratio_max, ratio);
  }
  const acc_t partial[kRowStats] = {loss_sum, n, n_low, n_high, n_dual, kl, ratio_sum, ratio_min, ratio_max};
  for (int k = 0; k < kRowStats; ++k) {
    acc_t v;
    if (k == 7) v = block_reduce(partial[k], MinOp<acc_t>(), smem);
    else if (k == 8) v = block_reduce(partial[k], MaxOp<acc_t>(), smem);
    else v = block_reduce(partial[k], SumOp<acc_t>(), smem);
    if (threadIdx.x == 0) row_stats[row * kRowStats + k] = v;
  }
}

template <typename acc_t>
__global__ void ppo_finalize_kernel(const acc_t* __restrict__ row_stats, acc_t* __restrict__ row_scale,
                                    acc_t* __restrict__ loss, acc_t* __restrict__ stats, int64_t B, int64_t agg,
                                    acc_t norm_len) {
  __shared__ acc_t smem[kThreads / kWarp];
  __shared__ acc_t inv_n_shared;
  const acc_t inf = INFINITY;
  acc_t tot[kRowStats] = {0, 0, 0, 0, 0, 0, 0, inf, -inf};
  acc_t seq_mean = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const acc_t* r = row_stats + b * kRowStats;
    for (int k = 0; k < 7; ++k) tot[k] += r[k];
    tot[7] = fmin(tot[7], r[7]);
    tot[8] = fmax(tot[8], r[8]);
    seq_mean += r[0] / fmax(r[1], acc_t(1));
  }
  for (int k = 0; k < kRowStats; ++k) {
    if (k == 7) tot[k] = block_reduce(tot[k], MinOp<acc_t>(), smem);
    else if (k == 8) tot[k] = block_reduce(tot[k], MaxOp<acc_t>(), smem);
    else tot[k] = block_reduce(tot[k], SumOp<acc_t>(), smem);
  }
  seq_mean = block_reduce(seq_mean, SumOp<acc_t>(), smem);
  if (threadIdx.x == 0) {
    const acc_t inv_n = acc_t(1) / fmax(tot[1], acc_t(1));
    inv_n_shared = inv_n;
    acc_t value;
    if (agg == kTokenMean) value = tot[0] * inv_n;
    else if (agg == kSeqMeanTokenSum) value = tot[0] / B;
    else if (agg == kSeqMeanTokenMean) value = seq_mean / B;
    else value = tot[0] / (B * norm_len);
    loss[0] = value;
    stats[0] = (tot[2] + tot[3]) * inv_n;
    stats[1] = tot[2] * inv_n;
    stats[2] = tot[3] * inv_n;
    stats[3] = tot[4] * inv_n;
    stats[4] = tot[5] * inv_n;
    stats[5] = tot[6] * inv_n;
    stats[6] = tot[1] > 0 ? tot[7] : acc_t(0);
    stats[7] = tot[1] > 0 ? tot[8] : acc_t(0);
  }
  __syncthreads();
  const acc_t inv_n = inv_n_shared;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    acc_t scale;
    if (agg == kTokenMean) scale = inv_n;
    else if (agg == kSeqMeanTokenSum) scale = acc_t(1) / B;
    else if (agg == kSeqMeanTokenMean) scale = acc_t(1) / (B * fmax(row_stats[b * kRowStats + 1], acc_t(1)));
    else scale = acc_t(1) / (B * norm_len);
    row_scale[b] = scale;
  }
}

template <typename acc_t>
__global__ void ppo_bwd_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ row_scale,
                               const float* __restrict__ upstream, acc_t* __restrict__ out, int64_t T,
                               int64_t numel) {
  const acc_t up = static_cast<acc_t>(upstream[0]);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = grad[i] * row_scale[i / T] * up;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask, double gamma, double lam) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto out_type = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = at::empty({B, T}, rewards.options().dtype(out_type));
  at::Tensor ret = at::empty({B, T}, rewards.options().dtype(out_type));
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((B + kGaeWarps - 1) / kGaeWarps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gae_kernel<scalar_t, acc_t><<<blocks, kGaeWarps * kWarp, 0, stream>>>(
        rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask_ptr, adv.data_ptr<acc_t>(),
        ret.data_ptr<acc_t>(), B, T, static_cast<acc_t>(gamma), static_cast<acc_t>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, double clip_low, double clip_high, double dual_clip, int64_t agg,
    double norm_len, bool need_grad) {
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto out_type = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logprobs.options().dtype(out_type);
  at::Tensor grad = need_grad ? at::empty({B, T}, opts) : at::empty({0}, opts);
  at::Tensor row_stats = at::empty({B, kRowStats}, opts);
  at::Tensor row_scale = at::empty({B}, opts);
  at::Tensor stats = at::empty({8}, opts);
  at::Tensor loss = at::empty({}, opts);
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int64_t adv_stride_b = advantages.dim() == 2 ? T : 1, adv_stride_t = advantages.dim() == 2 ? 1 : 0;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "ppo_policy_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ppo_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        logprobs.data_ptr<scalar_t>(), old_logprobs.data_ptr<scalar_t>(), advantages.data_ptr<scalar_t>(),
        mask_ptr, need_grad ? grad.data_ptr<acc_t>() : nullptr, row_stats.data_ptr<acc_t>(), T, adv_stride_b,
        adv_stride_t, static_cast<acc_t>(1.0 - clip_low), static_cast<acc_t>(1.0 + clip_high),
        static_cast<acc_t>(dual_clip), dual_clip > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ppo_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
        row_stats.data_ptr<acc_t>(), row_scale.data_ptr<acc_t>(), loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>(),
        B, agg, static_cast<acc_t>(norm_len));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats, grad, row_scale};
}

at::Tensor ppo_policy_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& upstream) {
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  const int64_t numel = grad.numel();
  if (numel == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "ppo_policy_loss_bwd_cuda", [&] {
    ppo_bwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), row_scale.data_ptr<scalar_t>(), upstream.data_ptr<float>(),
        out.data_ptr<scalar_t>(), grad.size(1), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
