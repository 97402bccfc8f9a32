// GAE and the RL losses: declarations of the CPU (rl_cpu.cpp) and CUDA (rl_cuda.cu) implementations. The value
// loss and the KL penalty are CPU only (CUDA tensors run them in Triton).
//
// gae(rewards (B, T), values (B, T), mask (B, T) bool or undefined, gamma, lam) -> (advantages, returns)
//   verl's masked GAE; outputs fp32 (fp64 for fp64 inputs).
// ppo_policy_loss_fwd(logprobs (B, T), old_logprobs (B, T), advantages (B, T) or (B,), mask, clip_low, clip_high,
//                     dual_clip (<= 0: off), agg, norm_len, need_grad)
//   -> (loss (), stats (8,), grad (B, T) unscaled dloss_t/dlogprobs_t or empty, row_scale (B,))
// ppo_policy_loss_bwd(grad (B, T), row_scale (B,), upstream (1,)) -> grad * row_scale[:, None] * upstream
//   (the backward of the value loss too)
// value_loss_fwd(values, old_values, returns (B, T), mask, clip (<= 0: off), agg, norm_len, need_grad)
//   -> (loss (), stats (2,): clip_frac, values_mean, grad (B, T) unscaled or empty, row_scale (B,))
// kl_penalty_fwd(logprobs (...), ref_logprobs (...), kind 0/1/2 = k1/k2/k3, need_grad)
//   -> (kl (...), d kl / d logprobs (...) or empty); fp32 (fp64 for fp64 inputs). The backward is one product
//   with the upstream gradient, in torch (fastalign/ops/rl.py).
// kl_loss_fwd(logprobs (B, T), ref_logprobs (B, T), mask, kind, agg, norm_len, need_grad)
//   -> (loss (), grad (B, T) unscaled d k_t / d logprobs_t (0 where masked) or empty, row_scale (B,)): the KL
//   penalty aggregated like the losses, in one pass; backward: ppo_policy_loss_bwd (the gradient in ref_logprobs
//   is its negative).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask, double gamma, double lam);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, double clip_low, double clip_high, double dual_clip, int64_t agg,
    double norm_len, bool need_grad);
at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& upstream);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_fwd_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const c10::optional<at::Tensor>& mask, double clip, int64_t agg, double norm_len, bool need_grad);
std::tuple<at::Tensor, at::Tensor> kl_penalty_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                      int64_t kind, bool need_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_loss_fwd_cpu(const at::Tensor& logprobs,
                                                               const at::Tensor& ref_logprobs,
                                                               const c10::optional<at::Tensor>& mask, int64_t kind,
                                                               int64_t agg, double norm_len, bool need_grad);

#ifdef FASTALIGN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask, double gamma, double lam);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, double clip_low, double clip_high, double dual_clip, int64_t agg,
    double norm_len, bool need_grad);
at::Tensor ppo_policy_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& upstream);
#endif
