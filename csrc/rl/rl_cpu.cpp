// CPU GAE and PPO policy loss. Rows are independent: at::parallel_for (OpenMP) splits the batch; within a row the
// GAE recurrence is one sequential pass (~5 cycles a step: one FMA chain and a select). Interleaving rows to hide
// that latency was 4-8x slower at T = 2048: rows a power-of-two stride apart alias in L1 (five arrays per row), and a
// transposed L1 tile did not pay back its copies either.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common.h"
#include "rl.h"

namespace {

// verl's masked GAE for one row: next_value is the next valid value, run_adv the running advantage; a masked
// position leaves both unchanged and outputs the carried advantage.
template <bool HAS_MASK, typename scalar_t, typename acc_t>
inline void gae_row(const scalar_t* rewards, const scalar_t* values, const bool* mask, acc_t* adv, acc_t* ret,
                    int64_t T, acc_t gamma, acc_t gamma_lam) {
  acc_t next_value = 0, run_adv = 0;
  for (int64_t t = T - 1; t >= 0; --t) {
    const acc_t v = static_cast<acc_t>(values[t]);
    const acc_t a_new = static_cast<acc_t>(rewards[t]) + gamma * next_value - v + gamma_lam * run_adv;
    const bool valid = !HAS_MASK || mask[t];
    next_value = valid ? v : next_value;
    run_adv = valid ? a_new : run_adv;
    adv[t] = run_adv;
    ret[t] = run_adv + v;
  }
}

template <typename T>
inline T clamp(T x, T lo, T hi) { return std::min(std::max(x, lo), hi); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask, double gamma, double lam) {
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto out_type = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = at::empty({B, T}, rewards.options().dtype(out_type));
  at::Tensor ret = at::empty({B, T}, rewards.options().dtype(out_type));
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    acc_t* a = adv.data_ptr<acc_t>();
    acc_t* rt = ret.data_ptr<acc_t>();
    const acc_t g = static_cast<acc_t>(gamma), gl = static_cast<acc_t>(gamma * lam);
    // ~32k tokens per task keeps the OpenMP overhead small next to the work
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (mask_ptr != nullptr) {
          gae_row<true>(r + b * T, v + b * T, mask_ptr + b * T, a + b * T, rt + b * T, T, g, gl);
        } else {
          gae_row<false>(r + b * T, v + b * T, mask_ptr, a + b * T, rt + b * T, T, g, gl);
        }
      }
    });
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, double clip_low, double clip_high, double dual_clip, int64_t agg,
    double norm_len, bool need_grad) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto out_type = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logprobs.options().dtype(out_type);
  at::Tensor grad = need_grad ? at::empty({B, T}, opts) : at::empty({0}, opts);
  at::Tensor row_scale = at::empty({B}, opts);
  at::Tensor stats = at::empty({8}, opts);
  at::Tensor loss = at::empty({}, opts);
  std::vector<double> rows(static_cast<size_t>(B) * kRowStats);
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int64_t adv_stride_b = advantages.dim() == 2 ? T : 1, adv_stride_t = advantages.dim() == 2 ? 1 : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "ppo_policy_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* old = old_logprobs.data_ptr<scalar_t>();
    const scalar_t* adv = advantages.data_ptr<scalar_t>();
    acc_t* g = need_grad ? grad.data_ptr<acc_t>() : nullptr;
    const acc_t lo = acc_t(1) - static_cast<acc_t>(clip_low), hi = acc_t(1) + static_cast<acc_t>(clip_high);
    const acc_t dual = static_cast<acc_t>(dual_clip);
    const bool has_dual = dual_clip > 0;
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double loss_sum = 0, n = 0, n_low = 0, n_high = 0, n_dual = 0, kl = 0, ratio_sum = 0;
        double ratio_min = std::numeric_limits<double>::infinity(), ratio_max = -ratio_min;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = b * T + t;
          if (mask_ptr != nullptr && !mask_ptr[i]) {
            if (g) g[i] = acc_t(0);
            continue;
          }
          const acc_t log_ratio = static_cast<acc_t>(lp[i]) - static_cast<acc_t>(old[i]);
          const acc_t a = static_cast<acc_t>(adv[b * adv_stride_b + t * adv_stride_t]);
          const acc_t ratio = std::exp(log_ratio);
          const acc_t l_unclipped = -a * ratio;
          const acc_t l_clipped = -a * clamp(ratio, lo, hi);
          acc_t l = std::max(l_unclipped, l_clipped);
          acc_t d = l_clipped > l_unclipped ? acc_t(0) : l_unclipped;  // d(-A ratio)/d logprob = -A ratio
          if (has_dual && a < 0 && l > -a * dual) {
            l = -a * dual;
            d = acc_t(0);
            n_dual += 1;
          }
          if (g) g[i] = d;
          loss_sum += l;
          n += 1;
          n_low += (a < 0 && ratio < lo) ? 1 : 0;
          n_high += (a > 0 && ratio > hi) ? 1 : 0;
          kl -= log_ratio;
          ratio_sum += ratio;
          ratio_min = std::min<double>(ratio_min, ratio);
          ratio_max = std::max<double>(ratio_max, ratio);
        }
        double* out = rows.data() + b * kRowStats;
        out[0] = loss_sum; out[1] = n; out[2] = n_low; out[3] = n_high; out[4] = n_dual;
        out[5] = kl; out[6] = ratio_sum; out[7] = ratio_min; out[8] = ratio_max;
      }
    });
    // finalize: [B]-sized, serial
    double tot[kRowStats] = {0, 0, 0, 0, 0, 0, 0, std::numeric_limits<double>::infinity(),
                             -std::numeric_limits<double>::infinity()};
    double seq_mean = 0;
    for (int64_t b = 0; b < B; ++b) {
      const double* r = rows.data() + b * kRowStats;
      for (int k = 0; k < 7; ++k) tot[k] += r[k];
      tot[7] = std::min(tot[7], r[7]);
      tot[8] = std::max(tot[8], r[8]);
      seq_mean += r[0] / std::max(r[1], 1.0);
    }
    const double inv_n = 1.0 / std::max(tot[1], 1.0);
    double loss_value;
    switch (agg) {
      case kTokenMean: loss_value = tot[0] * inv_n; break;
      case kSeqMeanTokenSum: loss_value = tot[0] / B; break;
      case kSeqMeanTokenMean: loss_value = seq_mean / B; break;
      default: loss_value = tot[0] / (B * norm_len); break;
    }
    loss.fill_(loss_value);
    acc_t* s = stats.data_ptr<acc_t>();
    s[0] = static_cast<acc_t>((tot[2] + tot[3]) * inv_n);
    s[1] = static_cast<acc_t>(tot[2] * inv_n);
    s[2] = static_cast<acc_t>(tot[3] * inv_n);
    s[3] = static_cast<acc_t>(tot[4] * inv_n);
    s[4] = static_cast<acc_t>(tot[5] * inv_n);
    s[5] = static_cast<acc_t>(tot[6] * inv_n);
    s[6] = static_cast<acc_t>(tot[1] > 0 ? tot[7] : 0.0);
    s[7] = static_cast<acc_t>(tot[1] > 0 ? tot[8] : 0.0);
    acc_t* w = row_scale.data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      double scale;
      switch (agg) {
        case kTokenMean: scale = inv_n; break;
        case kSeqMeanTokenSum: scale = 1.0 / B; break;
        case kSeqMeanTokenMean: scale = 1.0 / (B * std::max(rows[b * kRowStats + 1], 1.0)); break;
        default: scale = 1.0 / (B * norm_len); break;
      }
      w[b] = static_cast<acc_t>(scale);
    }
  });
  return {loss, stats, grad, row_scale};
}

at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& upstream) {
  const int64_t B = grad.size(0), T = grad.size(1);
  at::Tensor out = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "ppo_policy_loss_bwd_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* w = row_scale.data_ptr<scalar_t>();
    const scalar_t up = static_cast<scalar_t>(upstream.to(at::kDouble).item<double>());
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t scale = w[b] * up;
        for (int64_t t = 0; t < T; ++t) o[b * T + t] = g[b * T + t] * scale;
      }
    });
  });
  return out;
}
