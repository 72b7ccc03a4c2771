// CPU kernels of the native backend: fastdmd_native::dmd_target, its backward, and
// group_advantages. The math, and its spec, is fastdmd/ops/reference.py.
//
// dmd_target runs in two passes, as the Triton kernels do, over work items of one (sample, chunk)
// each (kChunk elements; see SampleChunks), spread over threads by at::parallel_for:
//   1. per item, the partial sum of |p_real| = |x0 - x0_real|; the partials of a sample, added in
//      chunk order, give its normalizer mean |p_real| + eps, which every element of pass 2 needs;
//   2. per item, grad, target = x0 - grad and the residual x0 - target per element, and partial
//      sums of grad^2, grad * p_real, p_real^2 and residual^2; then, on the calling thread, the
//      per-sample statistics and the weighted loss.
// at::parallel_for hands each thread the same contiguous range of items in both passes, and pass 2
// walks its range backwards, so it starts with the items that pass 1 read last (still in cache).
// Elements are converted to fp32 a tile at a time (kTile, so a tile's buffers stay in L1); the
// arithmetic per element is fp32, as in the reference; the sums are accumulated in fp64. A sample's
// results depend on its own elements only, never on the batch size or the number of threads.
#include "fastdmd_native.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastdmd_native {
namespace {

constexpr int64_t kTile = 1024;
constexpr int64_t kChunk = 16 * kTile;
// Inputs smaller than this run on the calling thread: a parallel region costs microseconds.
constexpr int64_t kMinParallelElements = 1 << 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The elements of a contiguous bf16, fp16 or fp32 tensor (the guards in library.cpp reject others).
struct Elements {
  const void* data;  // nullptr for an absent optional input
  at::ScalarType dtype;
};

Elements elements(const at::Tensor& t) { return {t.const_data_ptr(), t.scalar_type()}; }

// Float to bf16/fp16 rounds to nearest even.
template <typename Src, typename Dst>
void convert(const Src* src, int64_t n, Dst* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(src[i]);
}

// dst[i] = float(src[offset + i]) for i < n.
void load(const Elements& src, int64_t offset, int64_t n, float* dst) {
  switch (src.dtype) {
    case at::kFloat:
      return convert(static_cast<const float*>(src.data) + offset, n, dst);
    case at::kBFloat16:
      return convert(static_cast<const c10::BFloat16*>(src.data) + offset, n, dst);
    case at::kHalf:
      return convert(static_cast<const c10::Half*>(src.data) + offset, n, dst);
    default:
      TORCH_CHECK(false, "fastdmd_native: unsupported dtype ", src.dtype);
  }
}

// dst[offset + i] = src[i] rounded to dst's dtype, for i < n.
void store(const float* src, int64_t n, at::Tensor& dst, int64_t offset) {
  switch (dst.scalar_type()) {
    case at::kFloat:
      return convert(src, n, dst.mutable_data_ptr<float>() + offset);
    case at::kBFloat16:
      return convert(src, n, dst.mutable_data_ptr<c10::BFloat16>() + offset);
    case at::kHalf:
      return convert(src, n, dst.mutable_data_ptr<c10::Half>() + offset);
    default:
      TORCH_CHECK(false, "fastdmd_native: unsupported dtype ", dst.scalar_type());
  }
}

// Calls f(item, sample, begin, end) for every (sample, chunk) item of a [batch, M] tensor, with
// [begin, end) the chunk's flat element range, in parallel; each thread walks its contiguous
// range of items forwards, or backwards when `backwards`.
template <typename F>
void for_each_chunk(const SampleChunks& chunks, int64_t batch, bool backwards, const F& f) {
  const int64_t items = batch * chunks.num_chunks;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / chunks.chunk);
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) {
    for (int64_t k = 0; k < last - first; ++k) {
      const int64_t item = backwards ? last - 1 - k : first + k;
      const int64_t sample = item / chunks.num_chunks;
      const int64_t chunk = item % chunks.num_chunks;
      const int64_t sample_start = sample * chunks.numel_per_sample;
      const int64_t begin = sample_start + chunk * chunks.chunk;
      const int64_t end =
          sample_start + std::min(chunks.numel_per_sample, (chunk + 1) * chunks.chunk);
      f(item, sample, begin, end);
    }
  });
}

struct DMDInputs {
  Elements x0, x_t, real_cond, real_uncond, fake, noise;
  const float* a;  // [B] fp32
  const float* b;
  const float* c;  // nullptr without noise
  float guidance_scale;
};

// The fp32 values of one tile of a sample.
struct Tile {
  float x0[kTile];
  float base[kTile];     // a * x_t (+ c * noise): shared by both clean estimates
  float x0_real[kTile];  // base + b * (uncond + g * (cond - uncond))
  float scratch[kTile];
};

void load_clean_estimates(const DMDInputs& in, int64_t sample, int64_t offset, int64_t n, Tile& t) {
  const float a = in.a[sample], b = in.b[sample], g = in.guidance_scale;
  load(in.x0, offset, n, t.x0);
  load(in.x_t, offset, n, t.base);
  for (int64_t i = 0; i < n; ++i) t.base[i] *= a;
  if (in.noise.data != nullptr) {
    const float c = in.c[sample];
    load(in.noise, offset, n, t.scratch);
    for (int64_t i = 0; i < n; ++i) t.base[i] += c * t.scratch[i];
  }
  load(in.real_cond, offset, n, t.x0_real);
  if (in.real_uncond.data != nullptr) {
    load(in.real_uncond, offset, n, t.scratch);
    for (int64_t i = 0; i < n; ++i) t.x0_real[i] = t.scratch[i] + g * (t.x0_real[i] - t.scratch[i]);
  }
  for (int64_t i = 0; i < n; ++i) t.x0_real[i] = t.base[i] + b * t.x0_real[i];
}

// Pass 1: sum of |x0 - x0_real| over the elements [begin, end) of one sample.
double p_real_abs_sum(const DMDInputs& in, int64_t sample, int64_t begin, int64_t end) {
  Tile t;
  double sum = 0.0;
  for (int64_t offset = begin; offset < end; offset += kTile) {
    const int64_t n = std::min(kTile, end - offset);
    load_clean_estimates(in, sample, offset, n, t);
    double tile_sum = 0.0;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t i = 0; i < n; ++i) tile_sum += std::abs(t.x0[i] - t.x0_real[i]);
    sum += tile_sum;
  }
  return sum;
}

// Partial sums of pass 2, per item.
struct Stats {
  double grad_sq = 0.0, grad_dot_p = 0.0, p_sq = 0.0, residual_sq = 0.0;
};

// Pass 2 over the elements [begin, end) of one sample: writes target (in its dtype) and, when
// `residual` is given, the fp32 residual; returns the partial sums.
Stats dmd_elementwise(const DMDInputs& in, int64_t sample, int64_t begin, int64_t end,
                      float normalizer, at::Tensor& target, float* residual) {
  Tile t;
  float target_tile[kTile], residual_tile[kTile];
  const float b = in.b[sample];
  Stats stats;
  for (int64_t offset = begin; offset < end; offset += kTile) {
    const int64_t n = std::min(kTile, end - offset);
    load_clean_estimates(in, sample, offset, n, t);
    load(in.fake, offset, n, t.scratch);
    // Without a residual output the residual goes to a scratch tile (no branch in the loop).
    float* residual_out = residual != nullptr ? residual + offset : residual_tile;
    double grad_sq = 0.0, grad_dot_p = 0.0, p_sq = 0.0, residual_sq = 0.0;
#pragma omp simd reduction(+ : grad_sq, grad_dot_p, p_sq, residual_sq)
    for (int64_t i = 0; i < n; ++i) {
      const float x0_fake = t.base[i] + b * t.scratch[i];
      const float p_real = t.x0[i] - t.x0_real[i];
      float grad = (x0_fake - t.x0_real[i]) / normalizer;
      grad = std::abs(grad) < kInf ? grad : 0.0f;  // non-finite (NaN included) -> 0
      target_tile[i] = t.x0[i] - grad;
      // The loss is 0.5 * w * (x0 - target)^2 as in the reference: equal to grad^2 up to
      // rounding, but NaN where x0 is not finite, so a diverged generator shows in the loss.
      const float r = t.x0[i] - target_tile[i];
      residual_out[i] = r;
      const float p_finite = std::abs(p_real) < kInf ? p_real : 0.0f;
      grad_sq += static_cast<double>(grad) * grad;
      grad_dot_p += static_cast<double>(grad) * p_finite;
      p_sq += static_cast<double>(p_finite) * p_finite;
      residual_sq += static_cast<double>(r) * r;
    }
    store(target_tile, n, target, offset);
    stats.grad_sq += grad_sq;
    stats.grad_dot_p += grad_dot_p;
    stats.p_sq += p_sq;
    stats.residual_sq += residual_sq;
  }
  return stats;
}

at::Tensor fp32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

DMDTargetOutputs dmd_target_cpu(const at::Tensor& x0, const at::Tensor& x_t,
                                const at::Tensor& real_cond,
                                const std::optional<at::Tensor>& real_uncond,
                                const at::Tensor& fake, const at::Tensor& a, const at::Tensor& b,
                                double guidance_scale, const std::optional<at::Tensor>& weights,
                                const std::optional<at::Tensor>& noise,
                                const std::optional<at::Tensor>& c, double eps,
                                bool save_residual) {
  guard_dmd_target_args(x0, x_t, real_cond, real_uncond, fake, a, b, weights, noise, c);
  // Keep the contiguous copies (if any) alive while the kernels read them.
  const at::Tensor x0_c = x0.contiguous(), x_t_c = x_t.contiguous(),
                   cond_c = real_cond.contiguous(), fake_c = fake.contiguous();
  const at::Tensor uncond_c = real_uncond ? real_uncond->contiguous() : at::Tensor();
  const at::Tensor noise_c = noise ? noise->contiguous() : at::Tensor();
  const at::Tensor a_c = fp32_contiguous(a), b_c = fp32_contiguous(b);
  const at::Tensor c_c = c ? fp32_contiguous(*c) : at::Tensor();
  const at::Tensor w_c = weights ? fp32_contiguous(*weights) : at::Tensor();
  const Elements absent{nullptr, x0.scalar_type()};
  const DMDInputs in{elements(x0_c),
                     elements(x_t_c),
                     elements(cond_c),
                     real_uncond ? elements(uncond_c) : absent,
                     elements(fake_c),
                     noise ? elements(noise_c) : absent,
                     a_c.const_data_ptr<float>(),
                     b_c.const_data_ptr<float>(),
                     c ? c_c.const_data_ptr<float>() : nullptr,
                     static_cast<float>(guidance_scale)};

  DMDTargetOutputs outputs = empty_dmd_target_outputs(x0, save_residual);
  auto& [loss, target, normalizer, grad_sq, cosine, residual_sq_sum, residual] = outputs;
  const int64_t batch = x0.size(0);
  const SampleChunks chunks = sample_chunks(x0.numel() / batch, kChunk);
  const int64_t items = batch * chunks.num_chunks;

  std::vector<double> abs_partials(items);
  for_each_chunk(chunks, batch, /*backwards=*/false,
                 [&](int64_t item, int64_t sample, int64_t begin, int64_t end) {
                   abs_partials[item] = p_real_abs_sum(in, sample, begin, end);
                 });
  float* normalizer_out = normalizer.mutable_data_ptr<float>();
  for (int64_t sample = 0; sample < batch; ++sample) {
    double sum = 0.0;
    for (int64_t k = 0; k < chunks.num_chunks; ++k) {
      sum += abs_partials[sample * chunks.num_chunks + k];
    }
    normalizer_out[sample] = static_cast<float>(sum / chunks.numel_per_sample + eps);
  }

  std::vector<Stats> partials(items);
  float* residual_out = save_residual ? residual.mutable_data_ptr<float>() : nullptr;
  for_each_chunk(chunks, batch, /*backwards=*/true,
                 [&](int64_t item, int64_t sample, int64_t begin, int64_t end) {
                   partials[item] = dmd_elementwise(in, sample, begin, end, normalizer_out[sample],
                                                    target, residual_out);
                 });

  float* grad_sq_out = grad_sq.mutable_data_ptr<float>();
  float* cosine_out = cosine.mutable_data_ptr<float>();
  float* residual_sq_out = residual_sq_sum.mutable_data_ptr<float>();
  const float* w = weights ? w_c.const_data_ptr<float>() : nullptr;
  double weighted_residual_sq = 0.0;
  for (int64_t sample = 0; sample < batch; ++sample) {
    Stats total;
    for (int64_t k = 0; k < chunks.num_chunks; ++k) {
      const Stats& p = partials[sample * chunks.num_chunks + k];
      total.grad_sq += p.grad_sq;
      total.grad_dot_p += p.grad_dot_p;
      total.p_sq += p.p_sq;
      total.residual_sq += p.residual_sq;
    }
    grad_sq_out[sample] = static_cast<float>(total.grad_sq / chunks.numel_per_sample);
    cosine_out[sample] = static_cast<float>(
        total.grad_dot_p / std::max(std::sqrt(total.grad_sq) * std::sqrt(total.p_sq), 1e-12));
    residual_sq_out[sample] = static_cast<float>(total.residual_sq);
    weighted_residual_sq += (w != nullptr ? w[sample] : 1.0) * total.residual_sq;
  }
  loss.fill_(0.5 * weighted_residual_sq / static_cast<double>(x0.numel()));
  return outputs;
}

// d x0 = d_loss * w * residual / N, in x0's dtype.
at::Tensor dmd_target_backward_cpu(const at::Tensor& residual, const at::Tensor& d_loss,
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
  const at::Tensor r = residual.contiguous();
  const at::Tensor w = weights ? weights->to(at::kDouble).contiguous() : at::Tensor();
  const double* w_data = weights ? w.const_data_ptr<double>() : nullptr;
  const double scale = d_loss.to(at::kDouble).item<double>() / static_cast<double>(r.numel());
  at::Tensor d_x0 = at::empty(r.sizes(), r.options().dtype(x0_dtype));
  const float* r_data = r.const_data_ptr<float>();
  const SampleChunks chunks = sample_chunks(r.numel() / batch, kChunk);
  for_each_chunk(chunks, batch, /*backwards=*/false,
                 [&](int64_t, int64_t sample, int64_t begin, int64_t end) {
                   const double sample_scale = w_data != nullptr ? scale * w_data[sample] : scale;
                   float tile[kTile];
                   for (int64_t offset = begin; offset < end; offset += kTile) {
                     const int64_t n = std::min(kTile, end - offset);
                     for (int64_t i = 0; i < n; ++i) {
                       tile[i] = static_cast<float>(sample_scale * r_data[offset + i]);
                     }
                     store(tile, n, d_x0, offset);
                   }
                 });
  return d_x0;
}

GroupAdvantagesOutputs group_advantages_cpu(const at::Tensor& rewards,
                                            std::optional<int64_t> group_size,
                                            const std::optional<at::Tensor>& group_ids,
                                            const std::optional<at::Tensor>& weights, double eps,
                                            std::optional<double> clip) {
  guard_group_advantages_args(rewards, group_size, group_ids, weights);
  const GroupLayout layout = group_layout(rewards, group_size, group_ids);
  const int64_t n = rewards.size(0), k = rewards.size(1);
  // Rewards are few (N x K): computed in fp64 from one contiguous copy.
  const at::Tensor r = rewards.to(at::kDouble).contiguous();
  const at::Tensor w = weights ? weights->to(at::kDouble).contiguous() : at::ones({k}, r.options());
  const auto fp32 = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({n}, fp32);
  at::Tensor valid = at::empty({n}, rewards.options().dtype(at::kBool));
  at::Tensor group_mean = at::empty({layout.num_groups, k}, fp32);
  at::Tensor group_std = at::empty({layout.num_groups, k}, fp32);

  const double* r_data = r.const_data_ptr<double>();
  const double* w_data = w.const_data_ptr<double>();
  const int64_t* rows = layout.rows.defined() ? layout.rows.const_data_ptr<int64_t>() : nullptr;
  const int64_t* starts =
      layout.group_starts.defined() ? layout.group_starts.const_data_ptr<int64_t>() : nullptr;
  float* advantages_out = advantages.mutable_data_ptr<float>();
  bool* valid_out = valid.mutable_data_ptr<bool>();
  float* mean_out = group_mean.mutable_data_ptr<float>();
  float* std_out = group_std.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / (layout.largest_group * k));

  at::parallel_for(0, layout.num_groups, grain, [&](int64_t first, int64_t last) {
    std::vector<double> mean(k), std_plus_eps(k);
    for (int64_t g = first; g < last; ++g) {
      const int64_t start = starts != nullptr ? starts[g] : g * layout.largest_group;
      const int64_t size = starts != nullptr ? starts[g + 1] - start : layout.largest_group;
      auto row = [&](int64_t j) { return rows != nullptr ? rows[start + j] : start + j; };
      bool any_signal = false;
      for (int64_t q = 0; q < k; ++q) {
        double sum = 0.0;
        for (int64_t j = 0; j < size; ++j) sum += r_data[row(j) * k + q];
        mean[q] = sum / size;
        double sq = 0.0;
        for (int64_t j = 0; j < size; ++j) {
          const double d = r_data[row(j) * k + q] - mean[q];
          sq += d * d;
        }
        const double std = std::sqrt(sq / size);
        mean_out[g * k + q] = static_cast<float>(mean[q]);
        std_out[g * k + q] = static_cast<float>(std);
        any_signal = any_signal || std > eps;
        std_plus_eps[q] = std + eps;
      }
      // fused(j) = sum_q w_q * z_jq, recomputed in each of the three passes below (K is small).
      auto fused = [&](int64_t j) {
        double f = 0.0;
        for (int64_t q = 0; q < k; ++q) {
          f += (r_data[row(j) * k + q] - mean[q]) / std_plus_eps[q] * w_data[q];
        }
        return f;
      };
      double fused_sum = 0.0;
      for (int64_t j = 0; j < size; ++j) fused_sum += fused(j);
      const double fused_mean = fused_sum / size;
      double fused_sq = 0.0;
      for (int64_t j = 0; j < size; ++j) {
        const double d = fused(j) - fused_mean;
        fused_sq += d * d;
      }
      const double fused_std_plus_eps = std::sqrt(fused_sq / size) + eps;
      for (int64_t j = 0; j < size; ++j) {
        double advantage = (fused(j) - fused_mean) / fused_std_plus_eps;
        if (clip) advantage = advantage < -*clip ? -*clip : (advantage > *clip ? *clip : advantage);
        advantages_out[row(j)] = any_signal ? static_cast<float>(advantage) : 0.0f;
        valid_out[row(j)] = any_signal;
      }
    }
  });
  return {advantages, valid, group_mean, group_std};
}

}  // namespace
}  // namespace fastdmd_native

TORCH_LIBRARY_IMPL(fastdmd_native, CPU, m) {
  m.impl("dmd_target", &fastdmd_native::dmd_target_cpu);
  m.impl("dmd_target_backward", &fastdmd_native::dmd_target_backward_cpu);
  m.impl("group_advantages", &fastdmd_native::group_advantages_cpu);
}
