// fastalign._C: the optional compiled extension. Checks inputs once here, then dispatches on the device.
// torch/csrc/utils/pybind.h (the at::Tensor casters) instead of torch/extension.h: the whole C++ frontend
// is not needed here and doubles the compile time.
#include <torch/csrc/utils/pybind.h>

#include <cmath>

#include "common.h"
#include "rl/rl.h"

namespace {

void check_grid(const at::Tensor& x, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(x.device() == ref.device(), name, " is on ", x.device(), " but ", "the first input is on ", ref.device());
  TORCH_CHECK(x.sizes() == ref.sizes(), name, " must have shape ", ref.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, " dtype ", x.scalar_type(), " must match ",
              ref.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

void check_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& ref) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, "mask must be a bool tensor, got ", m.scalar_type());
  TORCH_CHECK(m.device() == ref.device(), "mask is on ", m.device(), " but the first input is on ", ref.device());
  TORCH_CHECK(m.is_contiguous(), "mask must be contiguous");
  TORCH_CHECK(m.sizes() == ref.sizes(), "mask must have shape ", ref.sizes(), ", got ", m.sizes());
}

// the losses read bool, fp32 or int64 masks in place (nonzero = valid); GAE takes bool
void check_loss_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& ref) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat || m.scalar_type() == at::kLong,
              "mask must be a bool, fp32 or int64 tensor, got ", m.scalar_type());
  TORCH_CHECK(m.device() == ref.device(), "mask is on ", m.device(), " but the first input is on ", ref.device());
  TORCH_CHECK(m.is_contiguous(), "mask must be contiguous");
  TORCH_CHECK(m.sizes() == ref.sizes(), "mask must have shape ", ref.sizes(), ", got ", m.sizes());
}

bool on_cuda(const at::Tensor& x) {
  if (!x.is_cuda()) return false;
#ifdef FASTALIGN_WITH_CUDA
  return true;
#else
  TORCH_CHECK(false, "fastalign._C was built without CUDA; rebuild it on a machine with nvcc: "
                     "`python -m fastalign.ext build`");
#endif
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values,
                                       const c10::optional<at::Tensor>& mask, double gamma, double lam) {
  CHECK_FLOAT(rewards);
  TORCH_CHECK(rewards.dim() == 2, "rewards must have shape (B, T), got ", rewards.sizes());
  CHECK_CONTIGUOUS(rewards);
  check_grid(values, "values", rewards);
  check_mask(mask, rewards);
  TORCH_CHECK(gamma >= 0 && gamma <= 1, "gamma must lie in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must lie in [0, 1], got ", lam);
  if (on_cuda(rewards)) {
#ifdef FASTALIGN_WITH_CUDA
    return gae_cuda(rewards, values, mask, gamma, lam);
#endif
  }
  return gae_cpu(rewards, values, mask, gamma, lam);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, double clip_low, double clip_high, double dual_clip, int64_t agg,
    double norm_len, bool need_grad) {
  CHECK_FLOAT(logprobs);
  TORCH_CHECK(logprobs.dim() == 2, "logprobs must have shape (B, T), got ", logprobs.sizes());
  CHECK_CONTIGUOUS(logprobs);
  check_grid(old_logprobs, "old_logprobs", logprobs);
  CHECK_DEVICE(advantages, logprobs);
  CHECK_SAME_DTYPE(advantages, logprobs);
  CHECK_CONTIGUOUS(advantages);
  TORCH_CHECK(advantages.sizes() == logprobs.sizes() ||
                  (advantages.dim() == 1 && advantages.size(0) == logprobs.size(0)),
              "advantages must have shape ", logprobs.sizes(), " or (", logprobs.size(0), "), got ",
              advantages.sizes());
  if (logprobs.is_cuda()) {
    check_mask(mask, logprobs);
  } else {
    check_loss_mask(mask, logprobs);
  }
  TORCH_CHECK(clip_low > 0, "clip_low must be > 0, got ", clip_low);
  TORCH_CHECK(clip_high > 0, "clip_high must be > 0, got ", clip_high);
  TORCH_CHECK(dual_clip <= 0 || dual_clip > 1, "dual_clip must be > 1 (or <= 0 for none), got ", dual_clip);
  TORCH_CHECK(agg >= kTokenMean && agg <= kSeqMeanTokenSumNorm, "agg must be an index in [0, 3], got ", agg);
  TORCH_CHECK(norm_len > 0, "norm_len must be > 0, got ", norm_len);
  if (on_cuda(logprobs)) {
#ifdef FASTALIGN_WITH_CUDA
    return ppo_policy_loss_fwd_cuda(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg,
                                    norm_len, need_grad);
#endif
  }
  return ppo_policy_loss_fwd_cpu(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, agg,
                                 norm_len, need_grad);
}

at::Tensor ppo_policy_loss_bwd(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& upstream) {
  TORCH_CHECK(grad.dim() == 2, "grad must have shape (B, T), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, "grad must be fp32/fp64");
  CHECK_CONTIGUOUS(grad);
  CHECK_DEVICE(row_scale, grad);
  CHECK_SAME_DTYPE(row_scale, grad);
  CHECK_CONTIGUOUS(row_scale);
  CHECK_SHAPE(row_scale, grad.size(0));
  CHECK_DEVICE(upstream, grad);
  TORCH_CHECK(upstream.numel() == 1, "upstream must hold one element, got ", upstream.sizes());
  if (on_cuda(grad)) {
#ifdef FASTALIGN_WITH_CUDA
    return ppo_policy_loss_bwd_cuda(grad, row_scale, upstream.to(at::kFloat).contiguous());
#endif
  }
  return ppo_policy_loss_bwd_cpu(grad, row_scale, upstream);
}

void cpu_only(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, " is implemented for CPU tensors only (CUDA tensors run it in Triton), got ",
              x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_fwd(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const c10::optional<at::Tensor>& mask, double clip, int64_t agg, double norm_len, bool need_grad) {
  CHECK_FLOAT(values);
  TORCH_CHECK(values.dim() == 2, "values must have shape (B, T), got ", values.sizes());
  CHECK_CONTIGUOUS(values);
  cpu_only(values, "value_loss_fwd");
  check_grid(old_values, "old_values", values);
  check_grid(returns, "returns", values);
  check_loss_mask(mask, values);
  TORCH_CHECK(std::isfinite(clip), "clip must be finite (<= 0 for none), got ", clip);
  TORCH_CHECK(agg >= kTokenMean && agg <= kSeqMeanTokenSumNorm, "agg must be an index in [0, 3], got ", agg);
  TORCH_CHECK(norm_len > 0, "norm_len must be > 0, got ", norm_len);
  return value_loss_fwd_cpu(values, old_values, returns, mask, clip, agg, norm_len, need_grad);
}

std::tuple<at::Tensor, at::Tensor> kl_penalty_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                  int64_t kind, bool need_grad) {
  CHECK_FLOAT(logprobs);
  CHECK_CONTIGUOUS(logprobs);
  cpu_only(logprobs, "kl_penalty_fwd");
  TORCH_CHECK(ref_logprobs.device() == logprobs.device(), "ref_logprobs is on ", ref_logprobs.device(),
              " but logprobs is on ", logprobs.device());
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes(), "ref_logprobs must have shape ", logprobs.sizes(), ", got ",
              ref_logprobs.sizes());
  CHECK_SAME_DTYPE(ref_logprobs, logprobs);
  CHECK_CONTIGUOUS(ref_logprobs);
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0, 1 or 2 (k1, k2, k3), got ", kind);
  return kl_penalty_fwd_cpu(logprobs, ref_logprobs, kind, need_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_loss_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                            const c10::optional<at::Tensor>& mask, int64_t kind,
                                                            int64_t agg, double norm_len, bool need_grad) {
  CHECK_FLOAT(logprobs);
  TORCH_CHECK(logprobs.dim() == 2, "logprobs must have shape (B, T), got ", logprobs.sizes());
  CHECK_CONTIGUOUS(logprobs);
  cpu_only(logprobs, "kl_loss_fwd");
  check_grid(ref_logprobs, "ref_logprobs", logprobs);
  check_loss_mask(mask, logprobs);
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0, 1 or 2 (k1, k2, k3), got ", kind);
  TORCH_CHECK(agg >= kTokenMean && agg <= kSeqMeanTokenSumNorm, "agg must be an index in [0, 3], got ", agg);
  TORCH_CHECK(norm_len > 0, "norm_len must be > 0, got ", norm_len);
  return kl_loss_fwd_cpu(logprobs, ref_logprobs, mask, kind, agg, norm_len, need_grad);
}

bool with_cuda() {
#ifdef FASTALIGN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastalign._C: C++/CUDA GAE and PPO policy loss, C++ value loss and KL penalty (see fastalign/ops/rl.py)";
  m.def("gae", &gae, "verl-style masked GAE -> (advantages, returns)", py::arg("rewards"), py::arg("values"),
        py::arg("mask"), py::arg("gamma"), py::arg("lam"));
  m.def("ppo_policy_loss_fwd", &ppo_policy_loss_fwd,
        "PPO clipped surrogate -> (loss, stats[8], unscaled grad, row scale)", py::arg("logprobs"),
        py::arg("old_logprobs"), py::arg("advantages"), py::arg("mask"), py::arg("clip_low"), py::arg("clip_high"),
        py::arg("dual_clip"), py::arg("agg"), py::arg("norm_len"), py::arg("need_grad"));
  m.def("ppo_policy_loss_bwd", &ppo_policy_loss_bwd, "grad * row_scale[:, None] * upstream", py::arg("grad"),
        py::arg("row_scale"), py::arg("upstream"));
  m.def("value_loss_fwd", &value_loss_fwd,
        "clipped value loss (CPU) -> (loss, stats[2], unscaled grad, row scale); backward: ppo_policy_loss_bwd",
        py::arg("values"), py::arg("old_values"), py::arg("returns"), py::arg("mask"), py::arg("clip"),
        py::arg("agg"), py::arg("norm_len"), py::arg("need_grad"));
  m.def("kl_penalty_fwd", &kl_penalty_fwd, "KL estimator k1/k2/k3 (CPU) -> (kl, d kl / d logprobs)",
        py::arg("logprobs"), py::arg("ref_logprobs"), py::arg("kind"), py::arg("need_grad"));
  m.def("kl_loss_fwd", &kl_loss_fwd,
        "KL estimator k1/k2/k3 aggregated like the losses (CPU) -> (loss, unscaled grad, row scale); backward: "
        "ppo_policy_loss_bwd", py::arg("logprobs"), py::arg("ref_logprobs"), py::arg("mask"), py::arg("kind"),
        py::arg("agg"), py::arg("norm_len"), py::arg("need_grad"));
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
}
