"""PPO clipped loss of an SDE sampler step, with its log-probs computed in fp32.

Where it sits: the policy-gradient update of RTDMD stage 2 and GNDM's importance sampling
(METHODS.md): for each sample, the policy's predicted mean of a stochastic step, the sample the
rollout actually drew (x_prev), the step's std, the log-prob recorded at rollout time and the
sample's advantage give the clipped surrogate loss. The math, and its spec, is
fastdmd.ops.reference.clipped_policy_loss. bf16 log-probs are a known source of NaN and of
on-policy ratios != 1 (DESIGN.md): here every log-prob is an fp32 reduction whose order depends
only on the sample size (sample_chunks.py), so recomputing a rollout's log-prob gives the same bits
whatever the batch, and the on-policy ratio is exactly 1.

Kernels:
  1. _squared_deviation_sum_kernel, one program per (sample, chunk): partial sums of
     (x_prev - mean)^2, upcast to fp32.
  2. _policy_loss_kernel, one program per block of samples: log_prob = -msd / (2 std^2) - log std
     - log(2 pi) / 2 with msd the mean squared deviation (the Gaussian log-density averaged over
     the M elements, flow-GRPO's convention), ratio, clipped loss, clip fraction, and
     d loss / d log_prob for backward.
  Backward: _policy_loss_backward_kernel, d mean = g * (x_prev - mean) / (std^2 M) with g the
  per-sample gradient reaching log_prob; d std = g * (msd / std^3 - 1 / std).

Bytes per element, E = input element size: forward reads x_prev and mean once (2E); backward
reads them again and writes d mean (3E). Nothing [B, ...]-sized is saved beyond the inputs.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastdmd.ops.checks import (KERNEL_DTYPES, check_clipped_policy_loss_inputs,
                                check_kernel_device)
from fastdmd.ops.reference import PolicyLoss
from fastdmd.ops.sample_chunks import sample_chunks

_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2 * math.pi))
# Tile of the per-sample program: samples x partial sums.
_LOSS_TILE = 1024  # 4096 took 234-255 registers per thread on sm_90 (compile_check)


@triton.jit
def _squared_deviation_sum_kernel(
    x_prev_ptr, mean_ptr, partials_ptr, numel_per_sample, num_chunks,
    BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // num_chunks
    chunk = pid % num_chunks
    sample_start = sample.to(tl.int64) * numel_per_sample
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(BLOCKS_PER_CHUNK):
        index = (chunk * BLOCKS_PER_CHUNK + i) * BLOCK + tl.arange(0, BLOCK)
        mask = index < numel_per_sample
        x = tl.load(x_prev_ptr + sample_start + index, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + sample_start + index, mask=mask, other=0.0).to(tl.float32)
        total += (x - mu) * (x - mu)
    tl.store(partials_ptr + pid, tl.sum(total, axis=0))


@triton.jit
def _policy_loss_kernel(
    partials_ptr, std_ptr, old_log_prob_ptr, advantages_ptr,
    loss_ptr, log_prob_ptr, ratio_ptr, clip_frac_ptr, mean_sq_dev_ptr, d_loss_d_log_prob_ptr,
    batch, num_chunks, numel_per_sample, clip_range, ratio_low, ratio_high,
    SAMPLES_BLOCK: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
):
    samples = tl.program_id(0) * SAMPLES_BLOCK + tl.arange(0, SAMPLES_BLOCK)
    in_batch = samples < batch
    slots = tl.arange(0, PARTIALS_BLOCK)
    partials = tl.load(partials_ptr + samples[:, None] * num_chunks + slots[None, :],
                       mask=in_batch[:, None] & (slots[None, :] < num_chunks), other=0.0)
    mean_sq_dev = tl.sum(partials, axis=1) / numel_per_sample
    std = tl.load(std_ptr + samples, mask=in_batch, other=1.0).to(tl.float32)
    old_log_prob = tl.load(old_log_prob_ptr + samples, mask=in_batch, other=0.0).to(tl.float32)
    advantages = tl.load(advantages_ptr + samples, mask=in_batch, other=0.0).to(tl.float32)

    log_prob = -mean_sq_dev / (2.0 * std * std) - tl.log(std) - _HALF_LOG_2PI
    ratio = tl.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * tl.clamp(ratio, ratio_low, ratio_high, propagate_nan=tl.PropagateNan.ALL)
    loss = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
    clip_frac = (tl.abs(ratio - 1.0) > clip_range).to(tl.float32)
    # The ratio carries gradient where the unclipped term is the max (ties inside the clip range
    # count as unclipped, as torch.maximum's split gradient adds up to there); d ratio / d log_prob
    # = ratio, so d loss / d log_prob = -A * ratio.
    unclipped_active = (unclipped > clipped) | ((ratio >= ratio_low) & (ratio <= ratio_high))
    d_loss_d_log_prob = tl.where(unclipped_active, unclipped, 0.0)

    tl.store(loss_ptr + samples, loss, mask=in_batch)
    tl.store(log_prob_ptr + samples, log_prob, mask=in_batch)
    tl.store(ratio_ptr + samples, ratio, mask=in_batch)
    tl.store(clip_frac_ptr + samples, clip_frac, mask=in_batch)
    tl.store(mean_sq_dev_ptr + samples, mean_sq_dev, mask=in_batch)
    tl.store(d_loss_d_log_prob_ptr + samples, d_loss_d_log_prob, mask=in_batch)


@triton.jit
def _policy_loss_backward_kernel(
    x_prev_ptr, mean_ptr, std_ptr, ratio_ptr, mean_sq_dev_ptr, d_loss_d_log_prob_ptr,
    d_loss_ptr, d_log_prob_ptr, d_ratio_ptr, d_mean_ptr, d_std_ptr, numel_per_sample, num_chunks,
    HAS_D_LOSS: tl.constexpr, HAS_D_LOG_PROB: tl.constexpr, HAS_D_RATIO: tl.constexpr,
    BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // num_chunks
    chunk = pid % num_chunks
    # g: the gradient reaching this sample's log_prob from every output that got one.
    g = 0.0
    if HAS_D_LOSS:
        g += tl.load(d_loss_ptr + sample).to(tl.float32) * tl.load(d_loss_d_log_prob_ptr + sample)
    if HAS_D_LOG_PROB:
        g += tl.load(d_log_prob_ptr + sample).to(tl.float32)
    if HAS_D_RATIO:
        g += tl.load(d_ratio_ptr + sample).to(tl.float32) * tl.load(ratio_ptr + sample)
    std = tl.load(std_ptr + sample).to(tl.float32)
    if chunk == 0:
        mean_sq_dev = tl.load(mean_sq_dev_ptr + sample)
        d_std = g * (mean_sq_dev / (std * std * std) - 1.0 / std)
        tl.store(d_std_ptr + sample, d_std.to(d_std_ptr.dtype.element_ty))
    scale = g / (std * std * numel_per_sample)
    sample_start = sample.to(tl.int64) * numel_per_sample
    for i in range(BLOCKS_PER_CHUNK):
        index = (chunk * BLOCKS_PER_CHUNK + i) * BLOCK + tl.arange(0, BLOCK)
        mask = index < numel_per_sample
        x = tl.load(x_prev_ptr + sample_start + index, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + sample_start + index, mask=mask, other=0.0).to(tl.float32)
        tl.store(d_mean_ptr + sample_start + index, ((x - mu) * scale).to(d_mean_ptr.dtype.element_ty),
                 mask=mask)


def _launch_clipped_policy_loss(x_prev, mean, std, old_log_prob, advantages, clip_range):
    batch = x_prev.shape[0]
    numel_per_sample = x_prev.numel() // batch
    chunks = sample_chunks(numel_per_sample)
    x_prev, mean, std, old_log_prob, advantages = (
        t.contiguous() for t in (x_prev, mean, std, old_log_prob, advantages))
    partials = torch.empty(batch * chunks.num_chunks, dtype=torch.float32, device=x_prev.device)
    outputs = [torch.empty(batch, dtype=torch.float32, device=x_prev.device) for _ in range(6)]
    _squared_deviation_sum_kernel[(batch * chunks.num_chunks,)](
        x_prev, mean, partials, numel_per_sample, chunks.num_chunks,
        BLOCK=chunks.block, BLOCKS_PER_CHUNK=chunks.blocks_per_chunk, num_warps=chunks.num_warps)
    # Tile shape from num_chunks only, so a sample's log_prob does not depend on the batch size.
    samples_block = max(1, _LOSS_TILE // chunks.partials_block)
    _policy_loss_kernel[(triton.cdiv(batch, samples_block),)](
        partials, std, old_log_prob, advantages, *outputs,
        batch, chunks.num_chunks, numel_per_sample, clip_range, 1.0 - clip_range, 1.0 + clip_range,
        SAMPLES_BLOCK=samples_block, PARTIALS_BLOCK=chunks.partials_block, num_warps=4)
    return tuple(outputs)


@torch.library.custom_op("fastdmd::clipped_policy_loss", mutates_args=())
def _clipped_policy_loss_op(
    x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, old_log_prob: torch.Tensor,
    advantages: torch.Tensor, clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, log_prob, ratio, clip_frac, mean squared deviation, d loss / d log_prob), all [B]."""
    return _launch_clipped_policy_loss(x_prev, mean, std, old_log_prob, advantages, clip_range)


@_clipped_policy_loss_op.register_fake
def _clipped_policy_loss_fake(x_prev, mean, std, old_log_prob, advantages, clip_range):
    return tuple(x_prev.new_empty((x_prev.shape[0],), dtype=torch.float32) for _ in range(6))


@torch.library.custom_op("fastdmd::clipped_policy_loss_backward", mutates_args=())
def _clipped_policy_loss_backward_op(
    x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, ratio: torch.Tensor,
    mean_sq_dev: torch.Tensor, d_loss_d_log_prob: torch.Tensor, d_loss: Optional[torch.Tensor],
    d_log_prob: Optional[torch.Tensor], d_ratio: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d mean, d std) from the gradients of the outputs loss, log_prob and ratio."""
    batch = x_prev.shape[0]
    numel_per_sample = x_prev.numel() // batch
    chunks = sample_chunks(numel_per_sample)
    x_prev, mean, std = x_prev.contiguous(), mean.contiguous(), std.contiguous()
    # Output gradients can be expanded views (the backward of loss.mean() has stride 0).
    d_loss, d_log_prob, d_ratio = (None if g is None else g.contiguous()
                                   for g in (d_loss, d_log_prob, d_ratio))
    d_mean = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)
    d_std = torch.empty(batch, dtype=std.dtype, device=std.device)
    # Absent output gradients are never read (their HAS_ flag is off): ratio stands in as a pointer.
    _policy_loss_backward_kernel[(batch * chunks.num_chunks,)](
        x_prev, mean, std, ratio, mean_sq_dev, d_loss_d_log_prob,
        ratio if d_loss is None else d_loss, ratio if d_log_prob is None else d_log_prob,
        ratio if d_ratio is None else d_ratio, d_mean, d_std, numel_per_sample, chunks.num_chunks,
        HAS_D_LOSS=d_loss is not None, HAS_D_LOG_PROB=d_log_prob is not None,
        HAS_D_RATIO=d_ratio is not None, BLOCK=chunks.block,
        BLOCKS_PER_CHUNK=chunks.blocks_per_chunk, num_warps=chunks.num_warps)
    return d_mean, d_std


@_clipped_policy_loss_backward_op.register_fake
def _clipped_policy_loss_backward_fake(x_prev, mean, std, ratio, mean_sq_dev, d_loss_d_log_prob,
                                       d_loss, d_log_prob, d_ratio):
    return mean.new_empty(mean.shape), std.new_empty((x_prev.shape[0],))


def _clipped_policy_loss_setup_context(ctx, inputs, output):
    x_prev, mean, std = inputs[:3]
    _, _, ratio, _, mean_sq_dev, d_loss_d_log_prob = output
    ctx.save_for_backward(x_prev, mean, std, ratio, mean_sq_dev, d_loss_d_log_prob)


def _clipped_policy_loss_backward(ctx, d_loss, d_log_prob, d_ratio, *unused_output_grads):
    d_mean, d_std = _clipped_policy_loss_backward_op(*ctx.saved_tensors, d_loss, d_log_prob, d_ratio)
    return (None, d_mean if ctx.needs_input_grad[1] else None,
            d_std if ctx.needs_input_grad[2] else None, None, None, None)


_clipped_policy_loss_op.register_autograd(_clipped_policy_loss_backward,
                                          setup_context=_clipped_policy_loss_setup_context)


def clipped_policy_loss(
    x_prev: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> PolicyLoss:
    """Triton version of fastdmd.ops.reference.clipped_policy_loss (same arguments, same result)."""
    check_clipped_policy_loss_inputs(x_prev, mean, std, old_log_prob, advantages, clip_range,
                                     dtypes=KERNEL_DTYPES)
    check_kernel_device(_policy_loss_kernel, x_prev.device)
    loss, log_prob, ratio, clip_frac, _, _ = _clipped_policy_loss_op(
        x_prev.detach(), mean, std, old_log_prob.detach(), advantages.detach(), float(clip_range))
    return PolicyLoss(loss, log_prob, ratio, clip_frac.detach())
