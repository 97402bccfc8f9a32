// CPU GAE and the RL losses (PPO policy loss, clipped value loss, KL penalties). Rows are independent:
// at::parallel_for (OpenMP) splits the batch; within a row the GAE recurrence is one sequential pass (~5 cycles a
// step: one FMA chain and a select). Interleaving rows to hide that latency was 4-8x slower at T = 2048: rows a
// power-of-two stride apart alias in L1 (five arrays per row), and a transposed L1 tile did not pay back its copies
// either.
//
// The losses are one pass over each row: the per-token loss, its derivative (the closed form, kept for the
// backward) and the row partials of the loss and the stats, branch-free (masked tokens are selected to zero, so
// garbage there never reaches a sum or the gradient). exp is a Cody-Waite + degree-7 polynomial for fp32 (within
// 1.2 ulp of the exact value over [-87, 88.7]; inf / 0 / NaN like expf) and std::exp for fp64, so no libm call per
// token. fp32 policy rows run 8 tokens a step in GCC vector extensions; the other loops are written for GCC's
// vectorizer (AVX2 + FMA when the build machine has them, and -fno-trapping-math, see fastalign/_ext.py). Row
// partials go through float lanes flushed into double every 1024 tokens or so.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "rl.h"

// `#pragma` cannot stand inside the AT_DISPATCH macros' lambdas; _Pragma can
#define FA_SIMD _Pragma("omp simd")

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

// exp(x) for fp32 without a libm call: x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two for the reduction; n
// rounded with the 1.5 * 2^23 trick, which vectorizes without SSE4.1), e^r by its Taylor polynomial to degree 7
// (truncation < 1e-8 relative), times 2^n added to the exponent bits. Overflow gives inf, NaN stays NaN, and
// below the normal range (x < -87, e^x < 1.7e-38) it gives 0 where expf returns a tiny or denormal number.
inline float vexp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.72283f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) * (1 << 23);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  out = x > 88.72283f ? std::numeric_limits<float>::infinity() : out;
  out = x < -87.0f ? 0.0f : out;
  return x != x ? x : out;
}
inline double vexp(double x) { return std::exp(x); }

// The fp32 policy block in GCC vector extensions (8 lanes; AVX2 registers with -mavx2, SSE pairs without): the
// auto-vectorizer handled the token loop only in some instantiations and inlining contexts, so this one is spelled
// out. Same operations, in the same order, as PolicyToken and vexp.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f v8load(const float* p) { v8f x; std::memcpy(&x, p, sizeof(x)); return x; }
inline void v8store(float* p, v8f x) { std::memcpy(p, &x, sizeof(x)); }
inline v8f v8bc(float c) { return v8f{c, c, c, c, c, c, c, c}; }
inline v8f v8sel(v8i m, v8f a, v8f b) { return m ? a : b; }
inline v8f v8max(v8f x, v8f lo) { return v8sel(x < lo, lo, x); }  // std::max(x, lo): NaN x stays NaN
inline v8f v8min(v8f x, v8f hi) { return v8sel(hi < x, hi, x); }  // std::min(x, hi)

inline v8f v8exp(v8f x) {
  const v8f xc = v8min(v8max(x, v8bc(-87.0f)), v8bc(88.72283f));
  const v8f n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const v8f r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  v8f p = v8bc(1.98412698e-4f);
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v8i bits = reinterpret_cast<v8i&>(p) + __builtin_convertvector(n, v8i) * (1 << 23);
  v8f out = reinterpret_cast<const v8f&>(bits);
  out = v8sel(x > 88.72283f, v8bc(std::numeric_limits<float>::infinity()), out);
  out = v8sel(x < -87.0f, v8bc(0.0f), out);
  return v8sel(x != x, x, out);
}

// 8 staged tokens (log_ratio, A, validity; masked tokens staged as 0, 0, 0) into their derivative d and the
// accumulators acc[k] (k as in policy_row: loss, n, low, high, dual, kl, ratio sum, ratio min, ratio max).
template <bool HAS_DUAL>
inline void policy_block8(const float* lr_p, const float* a_p, const float* valid_p, float* d_out, float* const* acc,
                          float lo_s, float hi_s, float dual_s) {
  const v8f lr = v8load(lr_p), a = v8load(a_p), valid = v8load(valid_p);
  const v8f zero = v8bc(0.0f), one = v8bc(1.0f), lo = v8bc(lo_s), hi = v8bc(hi_s);
  const v8f ratio = v8exp(lr);
  const v8f l_unclipped = -a * ratio;
  const v8f l_clipped = -a * v8min(v8max(ratio, lo), hi);
  const v8i clipped = l_clipped > l_unclipped;
  v8f l = v8sel(clipped, l_clipped, l_unclipped);
  v8f d = v8sel(clipped, zero, l_unclipped);
  v8f dual = zero;
  if (HAS_DUAL) {
    const v8f l_dual = -a * dual_s;
    const v8i hit = (a < zero) & (l > l_dual);
    l = v8sel(hit, l_dual, l);
    d = v8sel(hit, zero, d);
    dual = v8sel(hit, one, zero);
  }
  const v8i is_valid = valid > zero;
  v8store(d_out, v8sel(is_valid, d, zero));
  v8store(acc[0], v8load(acc[0]) + v8sel(is_valid, l, zero));
  v8store(acc[1], v8load(acc[1]) + valid);
  v8store(acc[2], v8load(acc[2]) + v8sel((a < zero) & (ratio < lo), one, zero));
  v8store(acc[3], v8load(acc[3]) + v8sel((a > zero) & (ratio > hi), one, zero));
  v8store(acc[4], v8load(acc[4]) + dual);
  v8store(acc[5], v8load(acc[5]) - lr);
  v8store(acc[6], v8load(acc[6]) + valid * ratio);
  const v8f inf = v8bc(std::numeric_limits<float>::infinity());
  v8store(acc[7], v8min(v8load(acc[7]), v8sel(is_valid, ratio, inf)));
  v8store(acc[8], v8max(v8load(acc[8]), v8sel(is_valid, ratio, -inf)));
}

// k3 = e^d - 1 - d. fp32: the Taylor series to degree 12 for |d| <= 1 (the direct form cancels in fp32 there;
// truncation < 1e-9 relative), the direct form outside. fp64: expm1(d) - d, as the reference.
inline float k3_series(float d) {
  float q = 1.0f / 479001600;
  q = q * d + 1.0f / 39916800;
  q = q * d + 1.0f / 3628800;
  q = q * d + 1.0f / 362880;
  q = q * d + 1.0f / 40320;
  q = q * d + 1.0f / 5040;
  q = q * d + 1.0f / 720;
  q = q * d + 1.0f / 120;
  q = q * d + 1.0f / 24;
  q = q * d + 1.0f / 6;
  q = q * d + 0.5f;
  return q * d * d;
}
inline float k3_of(float d) {
  const float series = k3_series(d);
  const float direct = (vexp(d) - 1.0f) - d;
  return std::abs(d) <= 1.0f ? series : direct;
}
inline double k3_of(double d) { return std::expm1(d) - d; }

// row partials of the losses, in double: [0] loss sum, [1] valid count, then the loss's own stats
constexpr int kValueRowStats = 4;  // loss sum, n, n clipped, values sum

double aggregate(const double* rows, int stride, int64_t B, int64_t agg, double norm_len, double total_loss,
                 double total_n) {
  switch (agg) {
    case kTokenMean: return total_loss / std::max(total_n, 1.0);
    case kSeqMeanTokenSum: return total_loss / B;
    case kSeqMeanTokenMean: {
      double seq_mean = 0;
      for (int64_t b = 0; b < B; ++b) seq_mean += rows[b * stride] / std::max(rows[b * stride + 1], 1.0);
      return seq_mean / B;
    }
    default: return total_loss / (B * norm_len);
  }
}

// w_b: the loss is sum_bt w_b m_bt l_bt (fastalign/reference/rl.py, the module docstring)
template <typename acc_t>
void write_row_scale(acc_t* w, const double* rows, int stride, int64_t B, int64_t agg, double norm_len,
                     double total_n) {
  for (int64_t b = 0; b < B; ++b) {
    double scale;
    switch (agg) {
      case kTokenMean: scale = 1.0 / std::max(total_n, 1.0); break;
      case kSeqMeanTokenSum: scale = 1.0 / B; break;
      case kSeqMeanTokenMean: scale = 1.0 / (B * std::max(rows[b * stride + 1], 1.0)); break;
      default: scale = 1.0 / (B * norm_len); break;
    }
    w[b] = static_cast<acc_t>(scale);
  }
}

// The row loops below run in blocks of kLanes tokens with one accumulator per lane (plain arrays, no reduction
// clause: GCC vectorizes the block loop and keeps the accumulators in registers); the lanes are flushed into double
// every kFlush blocks and at the end of the row, so a float partial never sums more than kFlush terms.
constexpr int64_t kLanes = 16;
constexpr int64_t kFlush = 64;

template <typename acc_t, int K>
struct Lanes {
  acc_t v[K][kLanes];
  void zero(int k, acc_t x = acc_t(0)) { for (int64_t j = 0; j < kLanes; ++j) v[k][j] = x; }
  double sum(int k) const {
    double s = 0;
    for (int64_t j = 0; j < kLanes; ++j) s += v[k][j];
    return s;
  }
  acc_t min(int k) const { acc_t m = v[k][0]; for (int64_t j = 1; j < kLanes; ++j) m = std::min(m, v[k][j]); return m; }
  acc_t max(int k) const { acc_t m = v[k][0]; for (int64_t j = 1; j < kLanes; ++j) m = std::max(m, v[k][j]); return m; }
};

// One token of the PPO policy loss: its loss l, derivative d and stat flags; masked tokens give zeros.
template <bool HAS_DUAL, typename acc_t>
struct PolicyToken {
  acc_t l, d, ratio, log_ratio, valid, low, high, dual;
  inline PolicyToken(bool is_valid, acc_t log_ratio_in, acc_t a_in, acc_t lo, acc_t hi, acc_t dual_c) {
    log_ratio = is_valid ? log_ratio_in : acc_t(0);
    const acc_t a = is_valid ? a_in : acc_t(0);
    ratio = vexp(log_ratio);
    const acc_t l_unclipped = -a * ratio;
    const acc_t l_clipped = -a * clamp(ratio, lo, hi);
    const bool clipped = l_clipped > l_unclipped;
    l = clipped ? l_clipped : l_unclipped;
    d = clipped ? acc_t(0) : l_unclipped;  // d(-A ratio)/d logprob = -A ratio
    dual = acc_t(0);
    if (HAS_DUAL) {
      const acc_t l_dual = -a * dual_c;
      const bool hit = (a < 0) & (l > l_dual);  // & not &&: no branch in the vector loop
      l = hit ? l_dual : l;
      d = hit ? acc_t(0) : d;
      dual = hit ? acc_t(1) : acc_t(0);
    }
    l = is_valid ? l : acc_t(0);
    d = is_valid ? d : acc_t(0);
    valid = is_valid ? acc_t(1) : acc_t(0);
    low = ((a < 0) & (ratio < lo)) ? acc_t(1) : acc_t(0);
    high = ((a > 0) & (ratio > hi)) ? acc_t(1) : acc_t(0);
  }
};

// The fp32 policy row without staging: 8 tokens a step straight from the inputs (mask: none, bool or fp32), the
// accumulators in registers, flushed into double every kFlush8 steps and at the end of the row; the ragged end goes
// through the staged scalar path. Same operations as policy_block8.
constexpr int64_t kFlush8 = 128;

typedef uint8_t v8u8 __attribute__((vector_size(8)));

template <typename M>
inline v8i v8valid(const M* mask, int64_t t) {
  if constexpr (std::is_same_v<M, bool>) {
    v8u8 m;
    std::memcpy(&m, mask + t, sizeof(m));
    return __builtin_convertvector(m, v8i) != 0;
  } else {
    return v8load(mask + t) != 0.0f;
  }
}

template <bool PER_ROW_ADV, bool HAS_DUAL, typename M>
__attribute__((noinline)) int64_t policy_row_f32(const float* __restrict__ lp, const float* __restrict__ old,
                                                 const float* __restrict__ adv, const M* __restrict__ mask,
                                                 float* __restrict__ g, int64_t T, float lo_s, float hi_s,
                                                 float dual_s, double* tot, float& ratio_min, float& ratio_max) {
  const v8f zero = v8bc(0.0f), one = v8bc(1.0f), lo = v8bc(lo_s), hi = v8bc(hi_s);
  const v8f inf = v8bc(std::numeric_limits<float>::infinity());
  const v8f a_row = v8bc(PER_ROW_ADV ? adv[0] : 0.0f);
  v8f s_loss = zero, s_n = zero, s_low = zero, s_high = zero, s_dual = zero, s_kl = zero, s_ratio = zero;
  v8f s_min = inf, s_max = -inf;
  auto flush = [&] {
    const v8f parts[7] = {s_loss, s_n, s_low, s_high, s_dual, s_kl, s_ratio};
    for (int k = 0; k < 7; ++k) {
      for (int j = 0; j < 8; ++j) tot[k] += parts[k][j];
    }
    for (int j = 0; j < 8; ++j) {
      ratio_min = std::min(ratio_min, s_min[j]);
      ratio_max = std::max(ratio_max, s_max[j]);
    }
    s_loss = s_n = s_low = s_high = s_dual = s_kl = s_ratio = zero;
    s_min = inf;
    s_max = -inf;
  };
  int64_t t = 0, steps = 0;
  for (; t + 8 <= T; t += 8) {
    const v8i is_valid = mask == nullptr ? (zero == zero) : v8valid(mask, t);
    const v8f lr = v8sel(is_valid, v8load(lp + t) - v8load(old + t), zero);
    const v8f a = v8sel(is_valid, PER_ROW_ADV ? a_row : v8load(adv + t), zero);
    const v8f ratio = v8exp(lr);
    const v8f l_unclipped = -a * ratio;
    const v8f l_clipped = -a * v8min(v8max(ratio, lo), hi);
    const v8i clipped = l_clipped > l_unclipped;
    v8f l = v8sel(clipped, l_clipped, l_unclipped);
    v8f d = v8sel(clipped, zero, l_unclipped);
    if (HAS_DUAL) {
      const v8f l_dual = -a * dual_s;
      const v8i hit = (a < zero) & (l > l_dual);
      l = v8sel(hit, l_dual, l);
      d = v8sel(hit, zero, d);
      s_dual += v8sel(hit, one, zero);
    }
    if (g != nullptr) v8store(g + t, v8sel(is_valid, d, zero));
    s_loss += v8sel(is_valid, l, zero);
    s_n += v8sel(is_valid, one, zero);
    s_low += v8sel((a < zero) & (ratio < lo), one, zero);
    s_high += v8sel((a > zero) & (ratio > hi), one, zero);
    s_kl -= lr;
    s_ratio += v8sel(is_valid, ratio, zero);
    s_min = v8min(s_min, v8sel(is_valid, ratio, inf));
    s_max = v8max(s_max, v8sel(is_valid, ratio, -inf));
    if (++steps == kFlush8) { flush(); steps = 0; }
  }
  flush();
  return t;  // tokens done; the caller finishes the row
}

// One row of the PPO policy loss. adv points at the row's advantages (PER_ROW_ADV: one value for the row). out:
// loss sum, n, n low, n high, n dual, kl sum (old - new), ratio sum, ratio min, ratio max (kRowStats).
// noinline here and below: inlined into the row loop's caller, GCC no longer vectorized the block loops
template <bool PER_ROW_ADV, bool HAS_DUAL, typename scalar_t, typename M, typename acc_t>
__attribute__((noinline)) void policy_row(const scalar_t* __restrict__ lp, const scalar_t* __restrict__ old,
                                          const scalar_t* __restrict__ adv, const M* __restrict__ mask,
                                          acc_t* __restrict__ g, int64_t T, acc_t lo, acc_t hi, acc_t dual,
                                          double* out) {
  const acc_t a_row = PER_ROW_ADV ? static_cast<acc_t>(adv[0]) : acc_t(0);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  double tot[7] = {0, 0, 0, 0, 0, 0, 0};
  acc_t ratio_min = inf, ratio_max = -inf;
  Lanes<acc_t, 9> acc;
  auto reset = [&] {
    for (int k = 0; k < 7; ++k) acc.zero(k);
    acc.zero(7, inf);
    acc.zero(8, -inf);
  };
  auto flush = [&] {
    for (int k = 0; k < 7; ++k) tot[k] += acc.sum(k);
    ratio_min = std::min(ratio_min, acc.min(7));
    ratio_max = std::max(ratio_max, acc.max(8));
    reset();
  };
  // Each block is staged first: the inputs as acc_t, masked tokens replaced by log_ratio = A = 0 (which gives l = d = 0
  // and no clip) and their validity 0. The token math then runs on the staged block, where GCC vectorizes it (with
  // the mask select in the same loop it did not).
  acc_t lr_b[kLanes], a_b[kLanes], valid_b[kLanes], scratch[kLanes];
  // Without a mask the validity is still a staged array, not a constant: folded into the token loop, the constant
  // left control flow there that GCC did not vectorize.
  auto stage = [=, &lr_b, &a_b, &valid_b](int64_t t0, int64_t n) {
    if (mask == nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        lr_b[j] = static_cast<acc_t>(lp[t0 + j]) - static_cast<acc_t>(old[t0 + j]);
        a_b[j] = PER_ROW_ADV ? a_row : static_cast<acc_t>(adv[t0 + j]);
        valid_b[j] = acc_t(1);
      }
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = t0 + j;
      const acc_t log_ratio_in = static_cast<acc_t>(lp[t]) - static_cast<acc_t>(old[t]);
      const acc_t a_in = PER_ROW_ADV ? a_row : static_cast<acc_t>(adv[t]);
      const bool valid = mask[t] != M(0);
      lr_b[j] = valid ? log_ratio_in : acc_t(0);
      a_b[j] = valid ? a_in : acc_t(0);
      valid_b[j] = valid ? acc_t(1) : acc_t(0);
    }
  };
  reset();
  int64_t t0 = 0, blocks = 0;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> &&
                (std::is_same_v<M, bool> || std::is_same_v<M, float>)) {
    float rmin = inf, rmax = -inf;
    t0 = policy_row_f32<PER_ROW_ADV, HAS_DUAL>(lp, old, adv, mask, g, T, lo, hi, dual, tot, rmin, rmax);
    ratio_min = rmin;
    ratio_max = rmax;
  }
  for (; t0 + kLanes <= T; t0 += kLanes) {
    stage(t0, kLanes);
    acc_t* __restrict__ gb = g != nullptr ? g + t0 : scratch;  // the store stays unconditional
    if constexpr (std::is_same_v<acc_t, float>) {
      for (int64_t h = 0; h < kLanes; h += 8) {
        float* lanes[9];
        for (int k = 0; k < 9; ++k) lanes[k] = acc.v[k] + h;
        policy_block8<HAS_DUAL>(lr_b + h, a_b + h, valid_b + h, gb + h, lanes, lo, hi, dual);
      }
      if (++blocks == kFlush) { flush(); blocks = 0; }
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const PolicyToken<HAS_DUAL, acc_t> x(true, lr_b[j], a_b[j], lo, hi, dual);
      const acc_t valid = valid_b[j];
      gb[j] = x.d;
      acc.v[0][j] += x.l; acc.v[1][j] += valid; acc.v[2][j] += x.low; acc.v[3][j] += x.high;
      acc.v[4][j] += x.dual; acc.v[5][j] -= x.log_ratio; acc.v[6][j] += valid * x.ratio;
      acc.v[7][j] = std::min(acc.v[7][j], valid > 0 ? x.ratio : inf);
      acc.v[8][j] = std::max(acc.v[8][j], valid > 0 ? x.ratio : -inf);
    }
    if (++blocks == kFlush) { flush(); blocks = 0; }
  }
  stage(t0, T - t0);  // the ragged end, in lanes 0 .. T - t0 - 1
  for (int64_t j = 0; t0 + j < T; ++j) {
    const PolicyToken<HAS_DUAL, acc_t> x(true, lr_b[j], a_b[j], lo, hi, dual);
    const acc_t valid = valid_b[j];
    if (g != nullptr) g[t0 + j] = x.d;
    acc.v[0][j] += x.l; acc.v[1][j] += valid; acc.v[2][j] += x.low; acc.v[3][j] += x.high;
    acc.v[4][j] += x.dual; acc.v[5][j] -= x.log_ratio; acc.v[6][j] += valid * x.ratio;
    acc.v[7][j] = std::min(acc.v[7][j], valid > 0 ? x.ratio : inf);
    acc.v[8][j] = std::max(acc.v[8][j], valid > 0 ? x.ratio : -inf);
  }
  flush();
  for (int k = 0; k < 7; ++k) out[k] = tot[k];
  out[7] = ratio_min; out[8] = ratio_max;
}

// One token of the value loss; CLIP: 0.5 max((v - R)^2, (old + clamp(v - old, -c, c) - R)^2), else 0.5 (v - R)^2.
// The derivative in v: v - R where the unclipped error wins (ties included), else the clipped error where the clamp
// passes v through (as torch.clamp's gradient, bounds included) and 0 where it clips.
template <bool CLIP, typename acc_t>
struct ValueToken {
  acc_t l, d, v, valid, clipped;
  inline ValueToken(bool is_valid, acc_t v_in, acc_t old_in, acc_t ret_in, acc_t clip) {
    v = is_valid ? v_in : acc_t(0);
    const acc_t r = is_valid ? ret_in : acc_t(0);
    const acc_t e1 = v - r;
    const acc_t sq1 = e1 * e1;
    l = acc_t(0.5) * sq1;
    d = e1;
    clipped = acc_t(0);
    if (CLIP) {
      const acc_t o = is_valid ? old_in : acc_t(0);
      const acc_t dv = v - o;
      const acc_t e2 = (o + clamp(dv, -clip, clip)) - r;
      const acc_t sq2 = e2 * e2;
      const bool c = sq2 > sq1;
      const bool inside = (dv >= -clip) & (dv <= clip);
      l = acc_t(0.5) * (c ? sq2 : sq1);
      d = c ? (inside ? e2 : acc_t(0)) : e1;
      clipped = (is_valid & c) ? acc_t(1) : acc_t(0);
    }
    l = is_valid ? l : acc_t(0);
    d = is_valid ? d : acc_t(0);
    valid = is_valid ? acc_t(1) : acc_t(0);
  }
};

// One row of the value loss. out: loss sum, n, n clipped, values sum (kValueRowStats).
template <bool HAS_MASK, bool CLIP, typename scalar_t, typename M, typename acc_t>
__attribute__((noinline)) void value_row(const scalar_t* __restrict__ v_in, const scalar_t* __restrict__ old_in,
               const scalar_t* __restrict__ ret_in, const M* __restrict__ mask, acc_t* __restrict__ g, int64_t T,
               acc_t clip, double* out) {
  double tot[kValueRowStats] = {0, 0, 0, 0};
  Lanes<acc_t, kValueRowStats> acc;
  auto reset = [&] { for (int k = 0; k < kValueRowStats; ++k) acc.zero(k); };
  auto flush = [&] {
    for (int k = 0; k < kValueRowStats; ++k) tot[k] += acc.sum(k);
    reset();
  };
  auto token = [=](int64_t t) {  // by value: stores in the loop cannot alias the captured pointers
    const bool valid = !HAS_MASK || mask[t] != M(0);
    return ValueToken<CLIP, acc_t>(valid, static_cast<acc_t>(v_in[t]), static_cast<acc_t>(old_in[t]),
                                   static_cast<acc_t>(ret_in[t]), clip);
  };
  reset();
  int64_t t0 = 0, blocks = 0;
  acc_t scratch[kLanes];  // where the derivative goes when it is not wanted: the store stays unconditional
  for (; t0 + kLanes <= T; t0 += kLanes) {
    acc_t* __restrict__ gb = g != nullptr ? g + t0 : scratch;
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const auto x = token(t0 + j);
      gb[j] = x.d;
      acc.v[0][j] += x.l; acc.v[1][j] += x.valid; acc.v[2][j] += x.clipped; acc.v[3][j] += x.v;
    }
    if (++blocks == kFlush) { flush(); blocks = 0; }
  }
  for (int64_t j = 0; t0 + j < T; ++j) {
    const auto x = token(t0 + j);
    if (g != nullptr) g[t0 + j] = x.d;
    acc.v[0][j] += x.l; acc.v[1][j] += x.valid; acc.v[2][j] += x.clipped; acc.v[3][j] += x.v;
  }
  flush();
  for (int k = 0; k < kValueRowStats; ++k) out[k] = tot[k];
}

// A buffer the kernels write: NaN-filled first under FASTALIGN_POISON=1 (the tests set it), so an element a kernel
// forgets to write shows up; uninitialised otherwise.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static const bool poison = [] {
    const char* env = std::getenv("FASTALIGN_POISON");
    return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
  }();
  at::Tensor out = at::empty(sizes, opts);
  if (poison && out.numel() > 0) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// KIND 0/1/2 = k1/k2/k3 of d = ref - logp and, with NEED_GRAD, dk/dlogp: 1, -d, -(e^d - 1) = -(d + k3)
template <int KIND, bool NEED_GRAD, typename scalar_t, typename acc_t>
__attribute__((noinline)) void kl_chunk(const scalar_t* __restrict__ lp, const scalar_t* __restrict__ rf,
                                        acc_t* __restrict__ k, acc_t* __restrict__ c, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(rf[i]) - static_cast<acc_t>(lp[i]);
    if (KIND == 0) {
      k[i] = static_cast<acc_t>(lp[i]) - static_cast<acc_t>(rf[i]);
      if (NEED_GRAD) c[i] = acc_t(1);
    } else if (KIND == 1) {
      k[i] = acc_t(0.5) * d * d;
      if (NEED_GRAD) c[i] = -d;
    } else {
      const acc_t q = k3_of(d);
      k[i] = q;
      if (NEED_GRAD) c[i] = -(d + q);
    }
  }
}

// The fp32 KL row with a bool / fp32 mask or none, 8 tokens a step in GCC vector extensions (the auto-vectorizer
// left some of these instantiations scalar, bool masks and k1 among them); same operations as kl_row's token. k3
// takes the series alone on a step whose |d| are all <= 1, both forms and the select otherwise. Adds the row's loss
// sum and valid count to tot[0], tot[1]; returns the tokens done (the caller finishes the row).
// whether every lane of a comparison result is true (one movemask with AVX)
inline bool v8all(v8i m) {
#ifdef __AVX__
  return __builtin_ia32_movmskps256(reinterpret_cast<__attribute__((vector_size(32))) float&>(m)) == 0xff;
#else
  int all = 1;
  for (int j = 0; j < 8; ++j) all &= m[j] != 0;
  return all != 0;
#endif
}

template <int KIND, typename M>
__attribute__((noinline)) int64_t kl_row_f32(const float* __restrict__ lp, const float* __restrict__ rf,
                                             const M* __restrict__ mask, float* __restrict__ g, int64_t T,
                                             double* tot) {
  const v8f zero = v8bc(0.0f), one = v8bc(1.0f);
  v8f s_k = zero, s_n = zero;
  auto flush = [&] {
    for (int j = 0; j < 8; ++j) {
      tot[0] += s_k[j];
      tot[1] += s_n[j];
    }
    s_k = s_n = zero;
  };
  int64_t t = 0, steps = 0;
  for (; t + 8 <= T; t += 8) {
    const v8i is_valid = mask == nullptr ? (zero == zero) : v8valid(mask, t);
    const v8f d = v8sel(is_valid, v8load(rf + t) - v8load(lp + t), zero);
    const v8f valid = v8sel(is_valid, one, zero);
    v8f k, c;
    if constexpr (KIND == 0) {
      k = -d;
      c = valid;
    } else if constexpr (KIND == 1) {
      k = 0.5f * d * d;
      c = -d;
    } else {
      v8f q = v8bc(1.0f / 479001600);
      q = q * d + 1.0f / 39916800;
      q = q * d + 1.0f / 3628800;
      q = q * d + 1.0f / 362880;
      q = q * d + 1.0f / 40320;
      q = q * d + 1.0f / 5040;
      q = q * d + 1.0f / 720;
      q = q * d + 1.0f / 120;
      q = q * d + 1.0f / 24;
      q = q * d + 1.0f / 6;
      q = q * d + 0.5f;
      k = q * d * d;
      const v8i small = v8sel(d < zero, -d, d) <= one;  // false for NaN
      if (!v8all(small)) k = v8sel(small, k, (v8exp(d) - 1.0f) - d);
      c = -(d + k);
    }
    if (g != nullptr) v8store(g + t, c);
    s_k += k;
    s_n += valid;
    if (++steps == kFlush8) { flush(); steps = 0; }
  }
  flush();
  return t;
}

// One row of the aggregated KL penalty: the masked k of d = ref - logp (KIND as kl_chunk) summed into out[0], the
// valid count into out[1] (kKLRowStats), and, with g, the unscaled derivative dk/dlogp (0 at masked tokens). Masked
// tokens are selected to d = 0 first, so whatever they hold never reaches a sum or the gradient.
constexpr int kKLRowStats = 2;

template <int KIND, bool HAS_MASK, typename scalar_t, typename M, typename acc_t>
__attribute__((noinline)) void kl_row(const scalar_t* __restrict__ lp, const scalar_t* __restrict__ rf,
                                      const M* __restrict__ mask, acc_t* __restrict__ g, int64_t T, double* out) {
  double tot[kKLRowStats] = {0, 0};
  Lanes<acc_t, kKLRowStats> acc;
  auto reset = [&] { for (int k = 0; k < kKLRowStats; ++k) acc.zero(k); };
  auto flush = [&] {
    for (int k = 0; k < kKLRowStats; ++k) tot[k] += acc.sum(k);
    reset();
  };
  // fp32 k3 computes both the series and the direct form and selects; a block whose |d| are all <= 1 (the usual
  // case: policy and reference log-probs close) takes the series alone, the same value at half the work
  constexpr bool kSplitK3 = KIND == 2 && std::is_same_v<acc_t, float>;
  // (k, dk/dlogp, valid) of token t; by value: stores in the loop cannot alias the captured pointers
  struct Token { acc_t k, c, valid; };
  auto token = [=](auto series_only, int64_t t) {
    const bool is_valid = !HAS_MASK || mask[t] != M(0);
    const acc_t d_in = static_cast<acc_t>(rf[t]) - static_cast<acc_t>(lp[t]);
    const acc_t d = is_valid ? d_in : acc_t(0);
    const acc_t valid = is_valid ? acc_t(1) : acc_t(0);
    if constexpr (KIND == 0) {
      return Token{-d, valid, valid};
    } else if constexpr (KIND == 1) {
      return Token{acc_t(0.5) * d * d, -d, valid};
    } else {
      acc_t k;
      if constexpr (kSplitK3 && decltype(series_only)::value) {
        k = k3_series(d);
      } else {
        k = k3_of(d);
      }
      return Token{k, -(d + k), valid};
    }
  };
  auto block = [&](auto series_only, acc_t* __restrict__ gb, int64_t t0) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const Token x = token(series_only, t0 + j);
      gb[j] = x.c;
      acc.v[0][j] += x.k;
      acc.v[1][j] += x.valid;
    }
  };
  reset();
  int64_t t0 = 0, blocks = 0;
  if constexpr (std::is_same_v<scalar_t, float> && (std::is_same_v<M, bool> || std::is_same_v<M, float>)) {
    t0 = kl_row_f32<KIND>(lp, rf, HAS_MASK ? mask : static_cast<const M*>(nullptr), g, T, tot);
  }
  acc_t scratch[kLanes];  // where the derivative goes when it is not wanted: the store stays unconditional
  for (; t0 + kLanes <= T; t0 += kLanes) {
    acc_t* __restrict__ gb = g != nullptr ? g + t0 : scratch;
    bool all_small = false;
    if constexpr (kSplitK3) {
      // tokens with |d| > 1 or NaN d, masked ones included (not reading the mask is cheaper; garbage there only
      // sends the block down the full path, which selects it away)
      acc_t n_big = 0;
#pragma omp simd reduction(+ : n_big)
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t d = static_cast<acc_t>(rf[t0 + j]) - static_cast<acc_t>(lp[t0 + j]);
        n_big += std::abs(d) <= acc_t(1) ? acc_t(0) : acc_t(1);
      }
      all_small = n_big == 0;
    }
    if (all_small) {
      block(std::true_type{}, gb, t0);
    } else {
      block(std::false_type{}, gb, t0);
    }
    if (++blocks == kFlush) { flush(); blocks = 0; }
  }
  for (int64_t j = 0; t0 + j < T; ++j) {
    const Token x = token(std::false_type{}, t0 + j);
    if (g != nullptr) g[t0 + j] = x.c;
    acc.v[0][j] += x.k;
    acc.v[1][j] += x.valid;
  }
  flush();
  for (int k = 0; k < kKLRowStats; ++k) out[k] = tot[k];
}

// f(mask pointer): the loss masks may be bool, fp32 or int64 (nonzero = valid), read in place
template <typename F>
void with_mask(const c10::optional<at::Tensor>& mask, F&& f) {
  if (!mask.has_value()) return f(static_cast<const bool*>(nullptr));
  switch (mask->scalar_type()) {
    case at::kBool: return f(static_cast<const bool*>(mask->data_ptr<bool>()));
    case at::kFloat: return f(static_cast<const float*>(mask->data_ptr<float>()));
    case at::kLong: return f(static_cast<const int64_t*>(mask->data_ptr<int64_t>()));
    default: TORCH_CHECK(false, "mask must be bool, fp32 or int64, got ", mask->scalar_type());
  }
}

template <typename F>
void over_rows(int64_t B, int64_t T, F&& row) {
  // ~16k tokens per task keeps the OpenMP overhead small next to the work
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) row(b);
  });
}

}  // namespace

// The outputs every row-stat loss shares: per-token derivative (B, T) when asked for, per-row weights (B,), the
// scalar loss, and STRIDE doubles of row statistics per row (column 0 the row's loss sum, column 1 its valid count).
struct RowLoss {
  at::Tensor grad, row_scale, loss;
  std::vector<double> rows;
  int stride;

  RowLoss(int64_t B, int64_t T, const at::TensorOptions& opts, int stride_, bool need_grad)
      : grad(need_grad ? new_output({B, T}, opts) : at::empty({0}, opts)),
        row_scale(new_output({B}, opts)),
        loss(at::empty({}, opts)),
        rows(static_cast<size_t>(B) * stride_),
        stride(stride_) {}

  double* row(int64_t b) { return rows.data() + b * stride; }

  // column sums of the first `n` statistics over the rows (serial: [B]-sized)
  void totals(double* tot, int n) const {
    const int64_t B = static_cast<int64_t>(rows.size()) / stride;
    for (int k = 0; k < n; ++k) tot[k] = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      for (int k = 0; k < n; ++k) tot[k] += rows[b * stride + k];
    }
  }

  // the aggregate into `loss` and the row weights of the backward, from the totals of columns 0 and 1
  template <typename acc_t>
  void finish(int64_t agg, double norm_len, const double* tot) {
    const int64_t B = static_cast<int64_t>(rows.size()) / stride;
    loss.fill_(aggregate(rows.data(), stride, B, agg, norm_len, tot[0], tot[1]));
    write_row_scale(row_scale.data_ptr<acc_t>(), rows.data(), stride, B, agg, norm_len, tot[1]);
  }
};

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask, double gamma, double lam) {
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto out_type = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor adv = new_output({B, T}, rewards.options().dtype(out_type));
  at::Tensor ret = new_output({B, T}, rewards.options().dtype(out_type));
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
  RowLoss out(B, T, opts, kRowStats, need_grad);
  at::Tensor stats = new_output({8}, opts);
  const bool per_row = advantages.dim() == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "ppo_policy_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* old = old_logprobs.data_ptr<scalar_t>();
    const scalar_t* adv = advantages.data_ptr<scalar_t>();
    acc_t* g = need_grad ? out.grad.data_ptr<acc_t>() : nullptr;
    const acc_t lo = acc_t(1) - static_cast<acc_t>(clip_low), hi = acc_t(1) + static_cast<acc_t>(clip_high);
    const acc_t dual = static_cast<acc_t>(dual_clip);
    const bool has_dual = dual_clip > 0;
    with_mask(mask, [&](auto mask_ptr) {
    over_rows(B, T, [&](int64_t b) {
      const scalar_t* a = adv + (per_row ? b : b * T);
      const auto* m = mask_ptr != nullptr ? mask_ptr + b * T : nullptr;
      acc_t* gb = g != nullptr ? g + b * T : nullptr;
      double* r = out.row(b);
      // the four variants of the row loop (a missing mask is a null pointer), each branch-free inside
      if (per_row) {
        has_dual ? policy_row<true, true>(lp + b * T, old + b * T, a, m, gb, T, lo, hi, dual, r)
                 : policy_row<true, false>(lp + b * T, old + b * T, a, m, gb, T, lo, hi, dual, r);
      } else {
        has_dual ? policy_row<false, true>(lp + b * T, old + b * T, a, m, gb, T, lo, hi, dual, r)
                 : policy_row<false, false>(lp + b * T, old + b * T, a, m, gb, T, lo, hi, dual, r);
      }
    });
    });
    // finalize: [B]-sized, serial; columns 7 and 8 are the ratio's min and max
    double tot[kRowStats];
    out.totals(tot, 7);
    tot[7] = std::numeric_limits<double>::infinity();
    tot[8] = -std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < B; ++b) {
      tot[7] = std::min(tot[7], out.row(b)[7]);
      tot[8] = std::max(tot[8], out.row(b)[8]);
    }
    const double inv_n = 1.0 / std::max(tot[1], 1.0);
    out.finish<acc_t>(agg, norm_len, tot);
    acc_t* s = stats.data_ptr<acc_t>();
    s[0] = static_cast<acc_t>((tot[2] + tot[3]) * inv_n);
    s[1] = static_cast<acc_t>(tot[2] * inv_n);
    s[2] = static_cast<acc_t>(tot[3] * inv_n);
    s[3] = static_cast<acc_t>(tot[4] * inv_n);
    s[4] = static_cast<acc_t>(tot[5] * inv_n);
    s[5] = static_cast<acc_t>(tot[6] * inv_n);
    s[6] = static_cast<acc_t>(tot[1] > 0 ? tot[7] : 0.0);
    s[7] = static_cast<acc_t>(tot[1] > 0 ? tot[8] : 0.0);
  });
  return {out.loss, stats, out.grad, out.row_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const c10::optional<at::Tensor>& mask, double clip, int64_t agg, double norm_len, bool need_grad) {
  const int64_t B = values.size(0), T = values.size(1);
  const auto out_type = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = values.options().dtype(out_type);
  RowLoss out(B, T, opts, kValueRowStats, need_grad);
  at::Tensor stats = new_output({2}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "value_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v = values.data_ptr<scalar_t>();
    const scalar_t* old = old_values.data_ptr<scalar_t>();
    const scalar_t* ret = returns.data_ptr<scalar_t>();
    acc_t* g = need_grad ? out.grad.data_ptr<acc_t>() : nullptr;
    const acc_t c = static_cast<acc_t>(clip);
    with_mask(mask, [&](auto mask_ptr) {
    over_rows(B, T, [&](int64_t b) {
      const int64_t o = b * T;
      const auto* m = mask_ptr != nullptr ? mask_ptr + o : nullptr;
      acc_t* gb = g != nullptr ? g + o : nullptr;
      double* r = out.row(b);
      if (m != nullptr) {
        clip > 0 ? value_row<true, true>(v + o, old + o, ret + o, m, gb, T, c, r)
                 : value_row<true, false>(v + o, old + o, ret + o, m, gb, T, c, r);
      } else {
        clip > 0 ? value_row<false, true>(v + o, old + o, ret + o, m, gb, T, c, r)
                 : value_row<false, false>(v + o, old + o, ret + o, m, gb, T, c, r);
      }
    });
    });
    double tot[kValueRowStats];
    out.totals(tot, kValueRowStats);
    const double inv_n = 1.0 / std::max(tot[1], 1.0);
    out.finish<acc_t>(agg, norm_len, tot);
    acc_t* s = stats.data_ptr<acc_t>();
    s[0] = static_cast<acc_t>(tot[2] * inv_n);
    s[1] = static_cast<acc_t>(tot[3] * inv_n);
  });
  return {out.loss, stats, out.grad, out.row_scale};
}

at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& upstream) {
  const int64_t B = grad.size(0), T = grad.size(1);
  at::Tensor out = new_output(grad.sizes(), grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "ppo_policy_loss_bwd_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* w = row_scale.data_ptr<scalar_t>();
    const scalar_t up = static_cast<scalar_t>(upstream.to(at::kDouble).item<double>());
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t scale = w[b] * up;
        const scalar_t* gb = g + b * T;
        scalar_t* ob = o + b * T;
FA_SIMD
        for (int64_t t = 0; t < T; ++t) ob[t] = gb[t] * scale;
      }
    });
  });
  return out;
}

// KL estimators of d = ref - logp and their derivative in logp (the derivative in ref is its negative):
//   k1 = -d, 1;   k2 = d^2 / 2, -d;   k3 = e^d - 1 - d, -(e^d - 1) = -(d + k3)
std::tuple<at::Tensor, at::Tensor> kl_penalty_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                      int64_t kind, bool need_grad) {
  const int64_t N = logprobs.numel();
  const auto out_type = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logprobs.options().dtype(out_type);
  at::Tensor kl = new_output(logprobs.sizes(), opts);
  at::Tensor coef = need_grad ? new_output(logprobs.sizes(), opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "kl_penalty_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* rf = ref_logprobs.data_ptr<scalar_t>();
    acc_t* k = kl.data_ptr<acc_t>();
    acc_t* c = need_grad ? coef.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, N, 32768, [&](int64_t begin, int64_t end) {
      const scalar_t* l = lp + begin;
      const scalar_t* r = rf + begin;
      acc_t* kb = k + begin;
      acc_t* cb = c != nullptr ? c + begin : nullptr;
      const int64_t n = end - begin;
      if (kind == 0) {
        cb != nullptr ? kl_chunk<0, true>(l, r, kb, cb, n) : kl_chunk<0, false>(l, r, kb, cb, n);
      } else if (kind == 1) {
        cb != nullptr ? kl_chunk<1, true>(l, r, kb, cb, n) : kl_chunk<1, false>(l, r, kb, cb, n);
      } else {
        cb != nullptr ? kl_chunk<2, true>(l, r, kb, cb, n) : kl_chunk<2, false>(l, r, kb, cb, n);
      }
    });
  });
  return {kl, coef};
}


// The KL penalty aggregated like the losses: one pass over each row (kl_row), then aggregate / write_row_scale as
// the value loss. The backward is ppo_policy_loss_bwd's product (in torch, in place, on CPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_loss_fwd_cpu(const at::Tensor& logprobs,
                                                               const at::Tensor& ref_logprobs,
                                                               const c10::optional<at::Tensor>& mask, int64_t kind,
                                                               int64_t agg, double norm_len, bool need_grad) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto out_type = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logprobs.options().dtype(out_type);
  RowLoss out(B, T, opts, kKLRowStats, need_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "kl_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* rf = ref_logprobs.data_ptr<scalar_t>();
    acc_t* g = need_grad ? out.grad.data_ptr<acc_t>() : nullptr;
    with_mask(mask, [&](auto mask_ptr) {
    over_rows(B, T, [&](int64_t b) {
      const int64_t o = b * T;
      const auto* m = mask_ptr != nullptr ? mask_ptr + o : nullptr;
      acc_t* gb = g != nullptr ? g + o : nullptr;
      double* r = out.row(b);
      if (m != nullptr) {
        kind == 0 ? kl_row<0, true>(lp + o, rf + o, m, gb, T, r)
        : kind == 1 ? kl_row<1, true>(lp + o, rf + o, m, gb, T, r)
                    : kl_row<2, true>(lp + o, rf + o, m, gb, T, r);
      } else {
        kind == 0 ? kl_row<0, false>(lp + o, rf + o, m, gb, T, r)
        : kind == 1 ? kl_row<1, false>(lp + o, rf + o, m, gb, T, r)
                    : kl_row<2, false>(lp + o, rf + o, m, gb, T, r);
      }
    });
    });
    double tot[kKLRowStats];
    out.totals(tot, kKLRowStats);
    out.finish<acc_t>(agg, norm_len, tot);
  });
  return {out.loss, out.grad, out.row_scale};
}
