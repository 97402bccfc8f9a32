// Input guards shared by every fastalign._C op: each names the offending argument.
#pragma once
// The few ATen headers the kernels use (not ATen/ATen.h or torch/extension.h): it halves the compile time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#define CHECK_DEVICE(x, ref) \
  TORCH_CHECK((x).device() == (ref).device(), #x " is on ", (x).device(), " but " #ref " is on ", (ref).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_SHAPE(x, ...)                                                                      \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define CHECK_FLOAT(x)                                                                                   \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||                     \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16,                  \
              #x " must be fp16/bf16/fp32/fp64, got ", (x).scalar_type())
#define CHECK_SAME_DTYPE(x, ref) \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), #x " dtype ", (x).scalar_type(), " must match " #ref " dtype ", (ref).scalar_type())
#define CHECK_BOOL(x) TORCH_CHECK((x).scalar_type() == at::kBool, #x " must be a bool tensor, got ", (x).scalar_type())

// Aggregation modes, in the order of fastalign.reference.rl.AGG_MODES.
enum AggMode : int64_t { kTokenMean = 0, kSeqMeanTokenSum = 1, kSeqMeanTokenMean = 2, kSeqMeanTokenSumNorm = 3 };
// Number of per-row partials of the policy loss: loss sum, n, clip low, clip high, dual, kl sum, ratio sum/min/max.
constexpr int kRowStats = 9;
