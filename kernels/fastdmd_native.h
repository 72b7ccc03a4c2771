// What the CPU and CUDA kernels of the native backend share: output tuples, the chunking of a
// sample for split reductions, the group layout of group_advantages, and argument guards.
//
// The math, and its spec, is fastdmd/ops/reference.py; the Python wrapper (fastdmd/ops/native.py)
// validates every argument with fastdmd/ops/checks.py before calling an op, so the guards here only
// protect memory (a wrong shape must not become an out-of-bounds read when an op is called directly
// through torch.ops.fastdmd_native).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastdmd_native {

// (loss, target, normalizer, grad_sq, cosine, residual_sq_sum, residual): as the Triton op
// fastdmd::dmd_target. residual = x0 - target in fp32, written only when save_residual (else
// empty); residual_sq_sum [B] is sum_j residual_ij^2, for the gradient of the loss w.r.t. weights.
using DMDTargetOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (advantages [N] fp32, valid [N] bool, group_mean [G, K] fp32, group_std [G, K] fp32).
using GroupAdvantagesOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A sample of M elements is cut into chunks of `chunk` elements; a per-sample reduction is one
// partial sum per chunk, added in chunk order. The cut depends on M only, never on the batch size
// or the number of threads, so a sample's statistics are the same bit for bit in any batch.
struct SampleChunks {
  int64_t numel_per_sample;
  int64_t chunk;       // elements per chunk (the last one may be shorter)
  int64_t num_chunks;  // chunks per sample
};

inline SampleChunks sample_chunks(int64_t numel_per_sample, int64_t max_chunk) {
  const int64_t chunk = numel_per_sample < max_chunk ? numel_per_sample : max_chunk;
  return {numel_per_sample, chunk, (numel_per_sample + chunk - 1) / chunk};
}

// Throws c10::Error unless the tensors of dmd_target have consistent shapes, dtypes and devices.
void guard_dmd_target_args(const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& real_cond,
                           const std::optional<at::Tensor>& real_uncond, const at::Tensor& fake,
                           const at::Tensor& a, const at::Tensor& b,
                           const std::optional<at::Tensor>& weights,
                           const std::optional<at::Tensor>& noise,
                           const std::optional<at::Tensor>& c);

// Empty outputs of dmd_target for x0 (residual sized only when save_residual).
DMDTargetOutputs empty_dmd_target_outputs(const at::Tensor& x0, bool save_residual);

// Where group g's rows are: rows [g*group_size, (g+1)*group_size) for contiguous groups (rows and
// group_starts undefined), or rows[group_starts[g] : group_starts[g+1]] with group g the g-th
// smallest distinct id (torch.unique order). Ids are sorted on the ids' device; the sizes need
// one device synchronization.
struct GroupLayout {
  int64_t num_groups;
  int64_t largest_group;
  at::Tensor rows;          // [N] int64, stable sort permutation of the ids
  at::Tensor group_starts;  // [G + 1] int64
};

GroupLayout group_layout(const at::Tensor& rewards, std::optional<int64_t> group_size,
                         const std::optional<at::Tensor>& group_ids);

// Throws c10::Error unless the arguments of group_advantages are consistent.
void guard_group_advantages_args(const at::Tensor& rewards, std::optional<int64_t> group_size,
                                 const std::optional<at::Tensor>& group_ids,
                                 const std::optional<at::Tensor>& weights);

}  // namespace fastdmd_native
