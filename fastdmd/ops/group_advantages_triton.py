"""Group-normalized advantages of several rewards, in one kernel launch.

Where it sits: after the rewards are scored, before any reward-weighted loss (GNDM's group
normalization, GDMD's target groups, RTDMD stage 2 and DrPO's per-prompt ranking: METHODS.md,
"Shared pieces"). The math, and its spec, is fastdmd.ops.reference.group_advantages.

One program per group holds the group's [n, K] rewards in registers and does everything in one
pass over them: per-reward mean and population std (two-pass, as the reference), z-scores, weighted
fusion, re-standardization, clipping, the zero-variance mask, and the stores. Rewards are small
(N x K floats), so this op is bound by launch latency, not bandwidth: one launch is the design.

Group layout:
  group_size=n: rows [g*n, (g+1)*n) form group g; the launcher only allocates and launches (no
    device synchronization, so it can sit in a CUDA graph).
  group_ids: the launcher sorts the ids (stable) and cuts the sorted order into segments, so group
    g is the g-th smallest distinct id (as torch.unique); the kernel reads its rows through the
    sort permutation and writes advantages back to the original rows. This costs a few small
    torch ops and one device synchronization (the number of groups and the largest group size
    decide output shape and block size); under torch.compile the number of groups is a
    data-dependent size.
Groups are held whole by one program: fastest for the usual groups of 2 to 1024 samples. A program's
tile, next_pow2(group size) x next_pow2(K), is at most Triton's 2^20 elements (with K = 8: groups of
up to 131,072 samples); a larger group is refused with a ValueError (the reference has no limit).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdmd.ops.checks import KERNEL_DTYPES, check_group_advantages_inputs, check_kernel_device
from fastdmd.ops.op_contracts import group_advantages_fake
from fastdmd.ops.reference import GroupAdvantages


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, stride_row, stride_reward, rows_ptr, group_starts_ptr, weights_ptr,
    advantages_ptr, valid_ptr, group_mean_ptr, group_std_ptr,
    group_size, num_rewards, eps, clip,
    BY_IDS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_CLIP: tl.constexpr,
    ROWS_BLOCK: tl.constexpr, REWARDS_BLOCK: tl.constexpr,
):
    group = tl.program_id(0)
    members = tl.arange(0, ROWS_BLOCK)
    if BY_IDS:
        start = tl.load(group_starts_ptr + group)
        size = tl.load(group_starts_ptr + group + 1) - start
        is_member = members < size
        rows = tl.load(rows_ptr + start + members, mask=is_member, other=0)
    else:
        size = group_size
        is_member = members < size
        rows = group * group_size + members
    rows = rows.to(tl.int64)
    reward_index = tl.arange(0, REWARDS_BLOCK)
    is_reward = reward_index < num_rewards
    mask = is_member[:, None] & is_reward[None, :]
    rewards = tl.load(rewards_ptr + rows[:, None] * stride_row + reward_index[None, :] * stride_reward,
                      mask=mask, other=0.0).to(tl.float32)
    count = size * 1.0

    mean = tl.sum(rewards, axis=0) / count
    centered = tl.where(mask, rewards - mean[None, :], 0.0)
    std = tl.sqrt(tl.sum(centered * centered, axis=0) / count)
    z = tl.where(mask, centered / (std[None, :] + eps), 0.0)
    if HAS_WEIGHTS:
        weights = tl.load(weights_ptr + reward_index, mask=is_reward, other=0.0).to(tl.float32)
        z = z * weights[None, :]
    fused = tl.sum(z, axis=1)

    fused_mean = tl.sum(tl.where(is_member, fused, 0.0), axis=0) / count
    fused_centered = tl.where(is_member, fused - fused_mean, 0.0)
    fused_std = tl.sqrt(tl.sum(fused_centered * fused_centered, axis=0) / count)
    advantages = fused_centered / (fused_std + eps)
    if HAS_CLIP:
        advantages = tl.clamp(advantages, -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    valid = tl.sum((is_reward & (std > eps)).to(tl.int32), axis=0) > 0
    advantages = tl.where(valid, advantages, 0.0)

    tl.store(advantages_ptr + rows, advantages, mask=is_member)
    tl.store(valid_ptr + rows, is_member & valid, mask=is_member)
    tl.store(group_mean_ptr + group * num_rewards + reward_index, mean, mask=is_reward)
    tl.store(group_std_ptr + group * num_rewards + reward_index, std, mask=is_reward)


MAX_TILE = tl.TRITON_MAX_TENSOR_NUMEL  # the most elements one Triton tensor may hold: 2^20


def _group_layout(num_samples, group_size, group_ids):
    """(rows, group_starts, num_groups, largest group size): the launcher's half of the
    segmentation; rows and group_starts are None for contiguous groups."""
    if group_ids is None:
        return None, None, num_samples // group_size, group_size
    sorted_ids, rows = torch.sort(group_ids, stable=True)
    sizes = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    group_starts = torch.zeros(sizes.numel() + 1, dtype=torch.int64, device=group_ids.device)
    torch.cumsum(sizes, dim=0, out=group_starts[1:])
    return rows, group_starts, sizes.numel(), int(sizes.max())


def _launch_group_advantages(rewards, group_size, group_ids, weights, eps, clip):
    num_samples, num_rewards = rewards.shape
    rows, group_starts, num_groups, largest_group = _group_layout(num_samples, group_size, group_ids)
    fp32 = dict(dtype=torch.float32, device=rewards.device)
    advantages = torch.empty(num_samples, **fp32)
    valid = torch.empty(num_samples, dtype=torch.bool, device=rewards.device)
    group_mean = torch.empty(num_groups, num_rewards, **fp32)
    group_std = torch.empty(num_groups, num_rewards, **fp32)
    rows_block = triton.next_power_of_2(largest_group)
    rewards_block = triton.next_power_of_2(num_rewards)
    if rows_block * rewards_block > MAX_TILE:
        raise ValueError(f"a group of {largest_group} samples with {num_rewards} rewards needs a "
                         f"{rows_block} x {rewards_block} tile, over the {MAX_TILE} elements one Triton program holds; "
                         f"use smaller groups, or ops.backend 'reference'")
    # Absent optional tensors are never read (their flag is off): rewards stands in as a pointer.
    _group_advantages_kernel[(num_groups,)](
        rewards, rewards.stride(0), rewards.stride(1),
        rewards if rows is None else rows, rewards if group_starts is None else group_starts,
        rewards if weights is None else weights.contiguous(),
        advantages, valid, group_mean, group_std,
        group_size or 0, num_rewards, eps, 0.0 if clip is None else clip,
        BY_IDS=group_ids is not None, HAS_WEIGHTS=weights is not None, HAS_CLIP=clip is not None,
        ROWS_BLOCK=rows_block, REWARDS_BLOCK=rewards_block,
        num_warps=max(1, min(8, rows_block * rewards_block // 256)))
    return advantages, valid, group_mean, group_std


@torch.library.custom_op("fastdmd::group_advantages", mutates_args=())
def _group_advantages_op(
    rewards: torch.Tensor, group_size: Optional[int], group_ids: Optional[torch.Tensor],
    weights: Optional[torch.Tensor], eps: float, clip: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_group_advantages(rewards, group_size, group_ids, weights, eps, clip)


_group_advantages_op.register_fake(group_advantages_fake)


def group_advantages(
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    clip: Optional[float] = 5.0,
) -> GroupAdvantages:
    """Triton version of fastdmd.ops.reference.group_advantages (same arguments, same result).

    Advantages are constants of the policy gradient, so the op has no backward: rewards are
    detached here, as in the reference.
    """
    check_group_advantages_inputs(rewards, group_size, group_ids, weights, eps, clip,
                                  dtypes=KERNEL_DTYPES)
    check_kernel_device(_group_advantages_kernel, rewards.device)
    weights = None if weights is None else weights.detach()
    return GroupAdvantages(*_group_advantages_op(
        rewards.detach(), None if group_size is None else int(group_size), group_ids, weights, float(eps),
        None if clip is None else float(clip)))
