// GAE and the PPO policy loss: declarations of the CPU (rl_cpu.cpp) and CUDA (rl_cuda.cu) implementations.
//
// gae(rewards (B, T), values (B, T), mask (B, T) bool or undefined, gamma, lam) -> (advantages, returns)
//   verl's masked GAE; outputs fp32 (fp64 for fp64 inputs).
// ppo_policy_loss_fwd(logprobs (B, T), old_logprobs (B, T), advantages (B, T) or (B,), mask, clip_low, clip_high,
//                     dual_clip (<= 0: off), agg, norm_len, need_grad)
//   -> (loss (), stats (8,), grad (B, T) unscaled dloss_t/dlogprobs_t or empty, row_scale (B,))
// ppo_policy_loss_bwd(grad (B, T), row_scale (B,), upstream (1,)) -> grad * row_scale[:, None] * upstream
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

#ifdef FASTALIGN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask, double gamma, double lam);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, double clip_low, double clip_high, double dual_clip, int64_t agg,
    double norm_len, bool need_grad);
at::Tensor ppo_policy_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& upstream);
#endif
