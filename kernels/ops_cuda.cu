// CUDA kernels of the native backend: fastdmd_native::dmd_target, its backward, and
// group_advantages, compiled when CMake's FASTDMD_CUDA is on. The math, and its spec, is
// fastdmd/ops/reference.py; the design follows the Triton kernels (fastdmd/ops/*_triton.py).
//
// dmd_target, one block per (sample, chunk) item (kChunk elements, see SampleChunks):
//   1. p_real_abs_partials: a block's partial sum of |x0 - x0_real|.
//   2. dmd_elementwise, same grid visited in reverse (pass 1 ended with the last items, whose
//      inputs are the likeliest to still be in L2): the block adds its sample's partials (in fp64,
//      the same order in every block, so all agree bit for bit) into the normalizer, then grad,
//      target, the residual x0 - target, and partial sums of grad^2, grad * p_real, p_real^2 and
//      residual^2.
//   3. finalize_samples, one block per sample: grad_sq, cosine, residual_sq_sum, w * residual_sq;
//      finalize_loss, one block: the loss. No atomics: every result is reproducible, and the cut
//      into chunks depends on M only, so a sample's results do not depend on the batch.
// Element arithmetic is fp32, block partial sums fp32 (as the Triton kernels), sums of partials
// fp64. The kernels read one element dtype; inputs of mixed dtypes are computed from fp32 copies.
// group_advantages: one block per group, everything in fp64 (the op is latency-bound).
#include "fastdmd_native.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <cmath>
#include <limits>

namespace fastdmd_native {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16 * kThreads;
// dynamic shared memory of group_advantages: mean and std + eps of each of the K rewards, fp64.
constexpr int64_t kMaxRewards = 2048;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The sum over the block of every thread's `value`, returned to every thread.
template <typename T>
__device__ T block_sum(T value) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ T total;
  const T sum = Reduce(storage).Sum(value);
  if (threadIdx.x == 0) total = sum;
  __syncthreads();
  const T result = total;
  __syncthreads();  // storage and total are reused by the next call
  return result;
}

template <typename scalar_t>
struct DMDArgs {
  const scalar_t* x0;
  const scalar_t* x_t;
  const scalar_t* real_cond;
  const scalar_t* real_uncond;  // nullptr without CFG
  const scalar_t* fake;
  const scalar_t* noise;        // nullptr without the shared-noise term
  const float* a;               // [B]
  const float* b;
  const float* c;               // nullptr without noise
  float guidance_scale;
  int64_t numel_per_sample;
  int64_t num_chunks;
};

struct Item {
  int64_t sample, chunk, begin, end;  // [begin, end): the chunk's flat element range
};

template <typename scalar_t>
__device__ Item item_of(const DMDArgs<scalar_t>& p, int64_t item) {
  const int64_t sample = item / p.num_chunks, chunk = item % p.num_chunks;
  const int64_t start = sample * p.numel_per_sample;
  const int64_t begin = start + chunk * kChunk;
  return {sample, chunk, begin, start + min(p.numel_per_sample, (chunk + 1) * kChunk)};
}

// base = a * x_t (+ c * noise), shared by both clean estimates; returns x0_real = base + b * CFG.
template <typename scalar_t>
__device__ float real_clean_estimate(const DMDArgs<scalar_t>& p, int64_t i, float a, float b,
                                     float c, float& base) {
  base = a * static_cast<float>(p.x_t[i]);
  if (p.noise != nullptr) base += c * static_cast<float>(p.noise[i]);
  float real = static_cast<float>(p.real_cond[i]);
  if (p.real_uncond != nullptr) {
    const float uncond = static_cast<float>(p.real_uncond[i]);
    real = uncond + p.guidance_scale * (real - uncond);
  }
  return base + b * real;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    p_real_abs_partials_kernel(DMDArgs<scalar_t> p, float* abs_partials) {
  const Item it = item_of(p, blockIdx.x);
  const float a = p.a[it.sample], b = p.b[it.sample];
  const float c = p.c != nullptr ? p.c[it.sample] : 0.0f;
  float sum = 0.0f;
  for (int64_t i = it.begin + threadIdx.x; i < it.end; i += kThreads) {
    float base;
    const float x0_real = real_clean_estimate(p, i, a, b, c, base);
    sum += fabsf(static_cast<float>(p.x0[i]) - x0_real);
  }
  const float total = block_sum(sum);
  if (threadIdx.x == 0) abs_partials[blockIdx.x] = total;
}

struct Stats {
  float grad_sq, grad_dot_p, p_sq, residual_sq;
};

__device__ Stats operator+(const Stats& x, const Stats& y) {
  return {x.grad_sq + y.grad_sq, x.grad_dot_p + y.grad_dot_p, x.p_sq + y.p_sq,
          x.residual_sq + y.residual_sq};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dmd_elementwise_kernel(DMDArgs<scalar_t> p, const float* abs_partials, float eps,
                           scalar_t* target, float* residual, float* normalizer_out,
                           Stats* stat_partials) {
  const int64_t item = gridDim.x - 1 - blockIdx.x;
  const Item it = item_of(p, item);
  double abs_sum = 0.0;
  for (int64_t k = threadIdx.x; k < p.num_chunks; k += kThreads) {
    abs_sum += abs_partials[it.sample * p.num_chunks + k];
  }
  const float normalizer =
      static_cast<float>(block_sum(abs_sum) / static_cast<double>(p.numel_per_sample) + eps);
  if (it.chunk == 0 && threadIdx.x == 0) normalizer_out[it.sample] = normalizer;

  const float a = p.a[it.sample], b = p.b[it.sample];
  const float c = p.c != nullptr ? p.c[it.sample] : 0.0f;
  Stats stats{0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t i = it.begin + threadIdx.x; i < it.end; i += kThreads) {
    const float x0 = static_cast<float>(p.x0[i]);
    float base;
    const float x0_real = real_clean_estimate(p, i, a, b, c, base);
    const float x0_fake = base + b * static_cast<float>(p.fake[i]);
    const float p_real = x0 - x0_real;
    float grad = (x0_fake - x0_real) / normalizer;
    grad = fabsf(grad) < kInf ? grad : 0.0f;  // non-finite (NaN included) -> 0
    const float t = x0 - grad;
    target[i] = static_cast<scalar_t>(t);
    // The loss is 0.5 * w * (x0 - target)^2 as in the reference: equal to grad^2 up to rounding,
    // but NaN where x0 is not finite, so a diverged generator shows in the loss.
    const float r = x0 - t;
    if (residual != nullptr) residual[i] = r;
    const float p_finite = fabsf(p_real) < kInf ? p_real : 0.0f;
    stats = stats + Stats{grad * grad, grad * p_finite, p_finite * p_finite, r * r};
  }
  const Stats total = block_sum(stats);
  if (threadIdx.x == 0) stat_partials[item] = total;
}

__global__ void __launch_bounds__(kThreads)
    finalize_samples_kernel(const Stats* stat_partials, const float* weights, int64_t num_chunks,
                            int64_t numel_per_sample, float* grad_sq_out, float* cosine_out,
                            float* residual_sq_out, double* weighted_residual_sq) {
  const int64_t sample = blockIdx.x;
  double sums[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t k = threadIdx.x; k < num_chunks; k += kThreads) {
    const Stats s = stat_partials[sample * num_chunks + k];
    sums[0] += s.grad_sq;
    sums[1] += s.grad_dot_p;
    sums[2] += s.p_sq;
    sums[3] += s.residual_sq;
  }
  for (double& sum : sums) sum = block_sum(sum);
  if (threadIdx.x == 0) {
    grad_sq_out[sample] = static_cast<float>(sums[0] / static_cast<double>(numel_per_sample));
    cosine_out[sample] =
        static_cast<float>(sums[1] / fmax(sqrt(sums[0]) * sqrt(sums[2]), 1e-12));
    residual_sq_out[sample] = static_cast<float>(sums[3]);
    weighted_residual_sq[sample] = (weights != nullptr ? weights[sample] : 1.0) * sums[3];
  }
}

__global__ void __launch_bounds__(kThreads)
    finalize_loss_kernel(const double* weighted_residual_sq, int64_t batch, int64_t numel,
                         float* loss) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < batch; i += kThreads) sum += weighted_residual_sq[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *loss = static_cast<float>(0.5 * sum / static_cast<double>(numel));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dmd_backward_kernel(const float* residual, const float* d_loss, const float* weights,
                        int64_t numel, int64_t numel_per_sample, scalar_t* d_x0) {
  const double scale = static_cast<double>(*d_loss) / static_cast<double>(numel);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const double w = weights != nullptr ? weights[i / numel_per_sample] : 1.0;
    d_x0[i] = static_cast<scalar_t>(static_cast<float>(scale * w * residual[i]));
  }
}

__global__ void __launch_bounds__(kThreads)
    group_advantages_kernel(const double* rewards, int64_t num_rewards, const int64_t* rows,
                            const int64_t* group_starts, int64_t group_size, const double* weights,
                            double eps, bool has_clip, double clip, float* advantages,
                            bool* valid, float* group_mean, float* group_std) {
  extern __shared__ double reward_stats[];  // mean[K], then std + eps [K]
  double* mean = reward_stats;
  double* std_plus_eps = reward_stats + num_rewards;
  const int64_t g = blockIdx.x;
  const int64_t start = group_starts != nullptr ? group_starts[g] : g * group_size;
  const int64_t size = group_starts != nullptr ? group_starts[g + 1] - start : group_size;
  auto row = [&](int64_t j) { return rows != nullptr ? rows[start + j] : start + j; };

  bool any_signal = false;  // the same in every thread: it is computed from block-wide sums
  for (int64_t q = 0; q < num_rewards; ++q) {
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < size; j += kThreads) sum += rewards[row(j) * num_rewards + q];
    const double m = block_sum(sum) / size;
    double sq = 0.0;
    for (int64_t j = threadIdx.x; j < size; j += kThreads) {
      const double d = rewards[row(j) * num_rewards + q] - m;
      sq += d * d;
    }
    const double s = sqrt(block_sum(sq) / size);
    any_signal = any_signal || s > eps;
    if (threadIdx.x == 0) {
      mean[q] = m;
      std_plus_eps[q] = s + eps;
      group_mean[g * num_rewards + q] = static_cast<float>(m);
      group_std[g * num_rewards + q] = static_cast<float>(s);
    }
  }
  __syncthreads();
  auto fused = [&](int64_t j) {
    double f = 0.0;
    for (int64_t q = 0; q < num_rewards; ++q) {
      f += (rewards[row(j) * num_rewards + q] - mean[q]) / std_plus_eps[q] *
           (weights != nullptr ? weights[q] : 1.0);
    }
    return f;
  };
  double fused_sum = 0.0;
  for (int64_t j = threadIdx.x; j < size; j += kThreads) fused_sum += fused(j);
  const double fused_mean = block_sum(fused_sum) / size;
  double fused_sq = 0.0;
  for (int64_t j = threadIdx.x; j < size; j += kThreads) {
    const double d = fused(j) - fused_mean;
    fused_sq += d * d;
  }
  const double fused_std_plus_eps = sqrt(block_sum(fused_sq) / size) + eps;
  for (int64_t j = threadIdx.x; j < size; j += kThreads) {
    double advantage = (fused(j) - fused_mean) / fused_std_plus_eps;
    if (has_clip) advantage = advantage < -clip ? -clip : (advantage > clip ? clip : advantage);
    advantages[row(j)] = any_signal ? static_cast<float>(advantage) : 0.0f;
    valid[row(j)] = any_signal;
  }
}

at::Tensor fp32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

DMDTargetOutputs dmd_target_cuda(const at::Tensor& x0, const at::Tensor& x_t,
                                 const at::Tensor& real_cond,
                                 const std::optional<at::Tensor>& real_uncond,
                                 const at::Tensor& fake, const at::Tensor& a, const at::Tensor& b,
                                 double guidance_scale, const std::optional<at::Tensor>& weights,
                                 const std::optional<at::Tensor>& noise,
                                 const std::optional<at::Tensor>& c, double eps,
                                 bool save_residual) {
  guard_dmd_target_args(x0, x_t, real_cond, real_uncond, fake, a, b, weights, noise, c);
  const c10::cuda::CUDAGuard device_guard(x0.device());
  const auto dtype = x0.scalar_type();
  bool same_dtype = x_t.scalar_type() == dtype && real_cond.scalar_type() == dtype &&
                    fake.scalar_type() == dtype;
  if (real_uncond) same_dtype = same_dtype && real_uncond->scalar_type() == dtype;
  if (noise) same_dtype = same_dtype && noise->scalar_type() == dtype;
  const auto element_dtype = same_dtype ? dtype : at::kFloat;
  auto elements = [&](const at::Tensor& t) { return t.to(element_dtype).contiguous(); };
  const at::Tensor x0_c = elements(x0), x_t_c = elements(x_t), cond_c = elements(real_cond),
                   fake_c = elements(fake);
  const at::Tensor uncond_c = real_uncond ? elements(*real_uncond) : at::Tensor();
  const at::Tensor noise_c = noise ? elements(*noise) : at::Tensor();
  const at::Tensor a_c = fp32_contiguous(a), b_c = fp32_contiguous(b);
  const at::Tensor c_c = c ? fp32_contiguous(*c) : at::Tensor();
  const at::Tensor w_c = weights ? fp32_contiguous(*weights) : at::Tensor();

  DMDTargetOutputs outputs = empty_dmd_target_outputs(x0, save_residual);
  auto& [loss, target, normalizer, grad_sq, cosine, residual_sq_sum, residual] = outputs;
  const at::Tensor target_out = same_dtype ? target : at::empty(x0.sizes(), x0_c.options());
  const int64_t batch = x0.size(0);
  const SampleChunks chunks = sample_chunks(x0.numel() / batch, kChunk);
  const int64_t items = batch * chunks.num_chunks;
  const auto fp32 = x0.options().dtype(at::kFloat);
  at::Tensor abs_partials = at::empty({items}, fp32);
  at::Tensor stat_partials = at::empty({items, 4}, fp32);
  at::Tensor weighted_residual_sq = at::empty({batch}, x0.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, element_dtype, "dmd_target_cuda", [&] {
    const DMDArgs<scalar_t> p{x0_c.const_data_ptr<scalar_t>(),
                              x_t_c.const_data_ptr<scalar_t>(),
                              cond_c.const_data_ptr<scalar_t>(),
                              real_uncond ? uncond_c.const_data_ptr<scalar_t>() : nullptr,
                              fake_c.const_data_ptr<scalar_t>(),
                              noise ? noise_c.const_data_ptr<scalar_t>() : nullptr,
                              a_c.const_data_ptr<float>(),
                              b_c.const_data_ptr<float>(),
                              c ? c_c.const_data_ptr<float>() : nullptr,
                              static_cast<float>(guidance_scale),
                              chunks.numel_per_sample,
                              chunks.num_chunks};
    p_real_abs_partials_kernel<scalar_t>
        <<<items, kThreads, 0, stream>>>(p, abs_partials.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dmd_elementwise_kernel<scalar_t><<<items, kThreads, 0, stream>>>(
        p, abs_partials.const_data_ptr<float>(), static_cast<float>(eps),
        target_out.mutable_data_ptr<scalar_t>(),
        save_residual ? residual.mutable_data_ptr<float>() : nullptr,
        normalizer.mutable_data_ptr<float>(),
        reinterpret_cast<Stats*>(stat_partials.mutable_data_ptr<float>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_samples_kernel<<<batch, kThreads, 0, stream>>>(
      reinterpret_cast<const Stats*>(stat_partials.const_data_ptr<float>()),
      weights ? w_c.const_data_ptr<float>() : nullptr, chunks.num_chunks, chunks.numel_per_sample,
      grad_sq.mutable_data_ptr<float>(), cosine.mutable_data_ptr<float>(),
      residual_sq_sum.mutable_data_ptr<float>(), weighted_residual_sq.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_loss_kernel<<<1, kThreads, 0, stream>>>(weighted_residual_sq.const_data_ptr<double>(),
                                                   batch, x0.numel(),
                                                   loss.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!same_dtype) target.copy_(target_out);
  return outputs;
}

at::Tensor dmd_target_backward_cuda(const at::Tensor& residual, const at::Tensor& d_loss,
                                    const std::optional<at::Tensor>& weights,
                                    at::ScalarType x0_dtype) {
  TORCH_CHECK(residual.dim() >= 1 && residual.numel() > 0 && residual.scalar_type() == at::kFloat,
              "fastdmd_native::dmd_target_backward: residual must be a non-empty fp32 [B, ...] "
              "tensor (the one dmd_target saved), got ", residual.scalar_type(), " of shape ",
              residual.sizes());
  TORCH_CHECK(d_loss.numel() == 1, "fastdmd_native::dmd_target_backward: d_loss must be a scalar");
  const int64_t batch = residual.size(0);
  if (weights) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == batch,
                "fastdmd_native::dmd_target_backward: weights must be a [B] tensor, B=", batch);
  }
  const c10::cuda::CUDAGuard device_guard(residual.device());
  const at::Tensor r = residual.contiguous();
  const at::Tensor d_loss_c = fp32_contiguous(d_loss);
  const at::Tensor w_c = weights ? fp32_contiguous(*weights) : at::Tensor();
  at::Tensor d_x0 = at::empty(r.sizes(), r.options().dtype(x0_dtype));
  const int64_t numel = r.numel();
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65536);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0_dtype, "dmd_target_backward_cuda",
                                  [&] {
                                    dmd_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                                        r.const_data_ptr<float>(), d_loss_c.const_data_ptr<float>(),
                                        weights ? w_c.const_data_ptr<float>() : nullptr, numel,
                                        numel / batch, d_x0.mutable_data_ptr<scalar_t>());
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return d_x0;
}

GroupAdvantagesOutputs group_advantages_cuda(const at::Tensor& rewards,
                                             std::optional<int64_t> group_size,
                                             const std::optional<at::Tensor>& group_ids,
                                             const std::optional<at::Tensor>& weights, double eps,
                                             std::optional<double> clip) {
  guard_group_advantages_args(rewards, group_size, group_ids, weights);
  const int64_t n = rewards.size(0), k = rewards.size(1);
  TORCH_CHECK(k <= kMaxRewards, "fastdmd_native::group_advantages: at most ", kMaxRewards,
              " rewards per sample on CUDA, got K=", k);
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const GroupLayout layout = group_layout(rewards, group_size, group_ids);
  const at::Tensor r = rewards.to(at::kDouble).contiguous();
  const at::Tensor w = weights ? weights->to(at::kDouble).contiguous() : at::Tensor();
  const auto fp32 = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({n}, fp32);
  at::Tensor valid = at::empty({n}, rewards.options().dtype(at::kBool));
  at::Tensor group_mean = at::empty({layout.num_groups, k}, fp32);
  at::Tensor group_std = at::empty({layout.num_groups, k}, fp32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  group_advantages_kernel<<<layout.num_groups, kThreads, 2 * k * sizeof(double), stream>>>(
      r.const_data_ptr<double>(), k,
      layout.rows.defined() ? layout.rows.const_data_ptr<int64_t>() : nullptr,
      layout.group_starts.defined() ? layout.group_starts.const_data_ptr<int64_t>() : nullptr,
      group_size.value_or(0), weights ? w.const_data_ptr<double>() : nullptr, eps, clip.has_value(),
      clip.value_or(0.0), advantages.mutable_data_ptr<float>(), valid.mutable_data_ptr<bool>(),
      group_mean.mutable_data_ptr<float>(), group_std.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {advantages, valid, group_mean, group_std};
}

}  // namespace
}  // namespace fastdmd_native

TORCH_LIBRARY_IMPL(fastdmd_native, CUDA, m) {
  m.impl("dmd_target", &fastdmd_native::dmd_target_cuda);
  m.impl("dmd_target_backward", &fastdmd_native::dmd_target_backward_cuda);
  m.impl("group_advantages", &fastdmd_native::group_advantages_cuda);
}
