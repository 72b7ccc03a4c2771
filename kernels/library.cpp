// The fastdmd_native operator library: op schemas (TORCH_LIBRARY) and the host code both devices
// share. The kernels are registered per device in ops_cpu.cpp (always) and ops_cuda.cu (when
// built with FASTDMD_CUDA); fake (meta) implementations and autograd are registered from Python
// by fastdmd/ops/native.py, which loads this library with torch.ops.load_library.
#include "fastdmd_native.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace fastdmd_native {

namespace {

bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void guard_same_shape(const char* name, const at::Tensor& t, const at::Tensor& x0) {
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "fastdmd_native::dmd_target: ", name,
              " must be bfloat16, float16 or float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x0.sizes(), "fastdmd_native::dmd_target: ", name, " has shape ",
              t.sizes(), " but x0 has shape ", x0.sizes());
  TORCH_CHECK(t.device() == x0.device(), "fastdmd_native::dmd_target: ", name, " is on ",
              t.device(), " but x0 is on ", x0.device());
}

void guard_per_sample(const char* name, const at::Tensor& t, const at::Tensor& x0) {
  TORCH_CHECK(t.is_floating_point(), "fastdmd_native::dmd_target: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x0.size(0), "fastdmd_native::dmd_target: ", name,
              " must be a [B] tensor with B=", x0.size(0), ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == x0.device(), "fastdmd_native::dmd_target: ", name, " is on ",
              t.device(), " but x0 is on ", x0.device());
}

}  // namespace

void guard_dmd_target_args(const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& real_cond,
                           const std::optional<at::Tensor>& real_uncond, const at::Tensor& fake,
                           const at::Tensor& a, const at::Tensor& b,
                           const std::optional<at::Tensor>& weights,
                           const std::optional<at::Tensor>& noise,
                           const std::optional<at::Tensor>& c) {
  TORCH_CHECK(x0.dim() >= 1 && x0.numel() > 0,
              "fastdmd_native::dmd_target: x0 must be a non-empty [B, ...] tensor, got shape ",
              x0.sizes());
  guard_same_shape("x0", x0, x0);
  guard_same_shape("x_t", x_t, x0);
  guard_same_shape("real_cond", real_cond, x0);
  guard_same_shape("fake", fake, x0);
  if (real_uncond) guard_same_shape("real_uncond", *real_uncond, x0);
  if (noise) guard_same_shape("noise", *noise, x0);
  guard_per_sample("a", a, x0);
  guard_per_sample("b", b, x0);
  if (weights) guard_per_sample("weights", *weights, x0);
  if (c) guard_per_sample("c", *c, x0);
  TORCH_CHECK(noise.has_value() == c.has_value(),
              "fastdmd_native::dmd_target: give both noise and c, or neither");
}

DMDTargetOutputs empty_dmd_target_outputs(const at::Tensor& x0, bool save_residual) {
  const auto fp32 = x0.options().dtype(at::kFloat);
  const int64_t batch = x0.size(0);
  return {at::empty({}, fp32),
          at::empty(x0.sizes(), x0.options()),
          at::empty({batch}, fp32),
          at::empty({batch}, fp32),
          at::empty({batch}, fp32),
          at::empty({batch}, fp32),
          save_residual ? at::empty(x0.sizes(), fp32) : at::empty({0}, fp32)};
}

GroupLayout group_layout(const at::Tensor& rewards, std::optional<int64_t> group_size,
                         const std::optional<at::Tensor>& group_ids) {
  const int64_t n = rewards.size(0);
  if (!group_ids) return {n / *group_size, *group_size, at::Tensor(), at::Tensor()};
  const auto [sorted_ids, rows] = at::sort(*group_ids, /*stable=*/true, /*dim=*/0,
                                           /*descending=*/false);
  const at::Tensor sizes = std::get<2>(at::unique_consecutive(sorted_ids, /*return_inverse=*/false,
                                                              /*return_counts=*/true));
  const at::Tensor group_starts =
      at::cat({at::zeros({1}, sizes.options()), at::cumsum(sizes, 0)}).to(at::kLong).contiguous();
  return {sizes.numel(), sizes.max().item<int64_t>(), rows.to(at::kLong).contiguous(),
          group_starts};
}

void guard_group_advantages_args(const at::Tensor& rewards, std::optional<int64_t> group_size,
                                 const std::optional<at::Tensor>& group_ids,
                                 const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(rewards.dim() == 2 && rewards.numel() > 0,
              "fastdmd_native::group_advantages: rewards must be a non-empty [N, K] tensor, got "
              "shape ", rewards.sizes());
  TORCH_CHECK(is_kernel_dtype(rewards.scalar_type()),
              "fastdmd_native::group_advantages: rewards must be bfloat16, float16 or float32, "
              "got ", rewards.scalar_type());
  TORCH_CHECK(group_size.has_value() != group_ids.has_value(),
              "fastdmd_native::group_advantages: give exactly one of group_size or group_ids");
  if (group_size) {
    TORCH_CHECK(*group_size >= 1 && rewards.size(0) % *group_size == 0,
                "fastdmd_native::group_advantages: group_size=", *group_size,
                " must be positive and divide N=", rewards.size(0));
  } else {
    const auto ids_dtype = group_ids->scalar_type();
    TORCH_CHECK(group_ids->dim() == 1 && group_ids->size(0) == rewards.size(0) &&
                    (ids_dtype == at::kInt || ids_dtype == at::kLong) &&
                    group_ids->device() == rewards.device(),
                "fastdmd_native::group_advantages: group_ids must be an int32/int64 [N] tensor on "
                "the rewards' device");
  }
  if (weights) {
    TORCH_CHECK(weights->is_floating_point() && weights->dim() == 1 &&
                    weights->size(0) == rewards.size(1) &&
                    weights->device() == rewards.device(),
                "fastdmd_native::group_advantages: weights must be a floating-point [K] tensor on "
                "the rewards' "
                "device, K=", rewards.size(1));
  }
}

}  // namespace fastdmd_native

TORCH_LIBRARY(fastdmd_native, m) {
  m.def(
      "dmd_target(Tensor x0, Tensor x_t, Tensor real_cond, Tensor? real_uncond, Tensor fake, "
      "Tensor a, Tensor b, float guidance_scale, Tensor? weights, Tensor? noise, Tensor? c, "
      "float eps, bool save_residual) -> (Tensor loss, Tensor target, Tensor normalizer, "
      "Tensor grad_sq, Tensor cosine, Tensor residual_sq_sum, Tensor residual)");
  m.def(
      "dmd_target_backward(Tensor residual, Tensor d_loss, Tensor? weights, ScalarType x0_dtype) "
      "-> Tensor");
  m.def(
      "group_advantages(Tensor rewards, int? group_size, Tensor? group_ids, Tensor? weights, "
      "float eps, float? clip) -> (Tensor advantages, Tensor valid, Tensor group_mean, "
      "Tensor group_std)");
}
