"""AdamW on fp32 master weights from bf16 gradients, writing the bf16 compute copy: one launch per step.

Where it sits: the optimizer phase with perf.master_weights (fastdmd.optim.MasterAdamW). The
generator and the critic compute on bf16 copies of their fp32 weights; this kernel reads each copy's
bf16 gradient directly, updates the fp32 weight and its two moments, writes the new weight, rounded,
into the copy the next forward reads, and (generator) moves the EMA. The math, and its spec, is
fastdmd.ops.reference.master_adamw_.

Bytes per parameter: read master 4 + grad 2 + exp_avg 4 + exp_avg_sq 4, write master 4 + exp_avg 4 +
exp_avg_sq 4 + copy 2 = 28, the same as torch's fused AdamW on fp32 gradients; with the EMA 8 more.
Done as separate torch ops the same update moves 28 + 6 (gradient cast to fp32) + 6 (copy refill) +
12 (EMA lerp) = 52. With beta1 = 0 (DMD2's, and fastdmd's default) the first moment is the gradient
itself: exp_avg is not read, 24 B; where no exp_avgs are given (MasterAdamW keeps none at beta1 = 0)
not written either, 20 B. The gradient clipping coefficient is read from the device (grad_scale), so
clipping costs no pass over the gradients either.

Many tensors, one launch: each program loads its parameter's addresses from tables on the device and
casts them to pointers; a map gives each program its (parameter, block). The addresses of the
tensors updated in place (master, moments, copy, EMA), their sizes and the map are written to the
device once per MasterAdamWPlan; only the gradients' addresses are written each update (gradients are
new tensors after every backward). So the host work of an update, which runs right after the
trainer's synchronization while the GPU waits, is a pass over the gradients, not over six lists.
Addresses read from memory tell the compiler nothing about alignment, and a mask from a size read
from memory nothing about uniformity: without help every load would be a scalar one. So when every
address is 16-byte aligned (the launcher checks; torch's allocations are) the kernel says so
(tl.multiple_of), and a program whose block lies wholly inside its tensor runs without a mask: its
fp32 loads and stores are 16-byte vectors (ld.global.v4 in the sm_90 PTX). Only a tensor's last block
runs masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdmd.ops.checks import check_kernel_device, check_master_adamw_update
from fastdmd.ops.reference import MasterAdamWPlan

# Elements per program: 4 per thread at 8 warps (one 16-byte load per fp32 stream). Compiled for sm_90 this
# takes 40 registers per thread, 6 programs per SM; 8 per thread takes 78 (benchmarks/results/triton_compile_sm90.md).
BLOCK = 1024
NUM_WARPS = 8

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _load(ptr, offsets, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offsets, mask=mask, other=0.0)
    return tl.load(ptr + offsets)


@triton.jit
def _store(ptr, offsets, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offsets, value, mask=mask)
    else:
        tl.store(ptr + offsets, value)


@triton.jit
def _update_block(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, copy_ptr, ema_ptr, grad_scale_ptr, offsets, mask,
                  decay_factor, beta1, beta2, step_size, bias_correction2_sqrt, eps, ema_weight,
                  COPY_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr, HAS_EMA: tl.constexpr, HAS_SCALE: tl.constexpr,
                  MOMENT_IS_GRAD: tl.constexpr, HAS_EXP_AVG: tl.constexpr, MASKED: tl.constexpr):
    g = _load(grad_ptr, offsets, mask, MASKED).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(grad_scale_ptr)
    p = _load(master_ptr, offsets, mask, MASKED)
    v = _load(exp_avg_sq_ptr, offsets, mask, MASKED)
    p = p * decay_factor
    if MOMENT_IS_GRAD:  # beta1 = 0: 0 * m + 1 * g is g exactly (m is finite: non-finite steps are skipped)
        m = g
    else:
        m = beta1 * _load(exp_avg_ptr, offsets, mask, MASKED) + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - step_size * m / denom
    _store(master_ptr, offsets, p, mask, MASKED)
    if HAS_EXP_AVG:
        _store(exp_avg_ptr, offsets, m, mask, MASKED)
    _store(exp_avg_sq_ptr, offsets, v, mask, MASKED)
    if HAS_COPY:
        _store(copy_ptr, offsets, p.to(COPY_DTYPE), mask, MASKED)
    if HAS_EMA:
        ema = _load(ema_ptr, offsets, mask, MASKED)
        # torch.lerp's two forms (which it picks by the weight), so the EMA matches _foreach_lerp_'s bits
        if ema_weight < 0.5:
            ema = ema + ema_weight * (p - ema)
        else:
            ema = p - (p - ema) * (1.0 - ema_weight)
        _store(ema_ptr, offsets, ema, mask, MASKED)


@triton.jit
def _master_adamw_kernel(
    table_ptr, grad_table_ptr, numels_ptr, block_rows_ptr, block_starts_ptr, grad_scale_ptr, skip_ptr,
    decay_factor, beta1, beta2, step_size, bias_correction2_sqrt, eps, ema_weight,
    GRAD_DTYPE: tl.constexpr, COPY_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr, HAS_EMA: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr, MOMENT_IS_GRAD: tl.constexpr, HAS_EXP_AVG: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(block_rows_ptr + pid).to(tl.int64)
    start = tl.load(block_starts_ptr + pid)
    numel = tl.load(numels_ptr + row)
    if HAS_SKIP:  # the trainer's non-finite loss or gradient, decided on the device: an empty mask, no writes
        numel = tl.where(tl.load(skip_ptr) != 0, 0, numel)
    entry = table_ptr + row * 5  # master, exp_avg, exp_avg_sq, copy, EMA addresses (absent ones 0)
    master_ptr = tl.load(entry).to(tl.pointer_type(tl.float32))
    grad_ptr = tl.load(grad_table_ptr + row).to(tl.pointer_type(GRAD_DTYPE))
    exp_avg_ptr = tl.load(entry + 1).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
    copy_ptr = tl.load(entry + 3).to(tl.pointer_type(COPY_DTYPE))
    ema_ptr = tl.load(entry + 4).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # addresses read from the table say nothing to the compiler: without these, no vector loads
        master_ptr = tl.multiple_of(master_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
        copy_ptr = tl.multiple_of(copy_ptr, 16)
        ema_ptr = tl.multiple_of(ema_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    args = (master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, copy_ptr, ema_ptr, grad_scale_ptr, offsets)
    scalars = (decay_factor, beta1, beta2, step_size, bias_correction2_sqrt, eps, ema_weight)
    if start + BLOCK <= numel:  # a whole block: no mask, so the loads and stores can be 16-byte vectors
        _update_block(*args, None, *scalars, COPY_DTYPE, HAS_COPY, HAS_EMA, HAS_SCALE, MOMENT_IS_GRAD, HAS_EXP_AVG,
                      False)
    else:
        _update_block(*args, offsets < numel, *scalars, COPY_DTYPE, HAS_COPY, HAS_EMA, HAS_SCALE, MOMENT_IS_GRAD,
                      HAS_EXP_AVG, True)


@torch.no_grad()
def master_adamw_(masters, grads, exp_avgs, exp_avg_sqs, copies, *, lr, beta1, beta2, eps, weight_decay, step,
                  grad_scale=None, emas=None, ema_weight=0.0, skip=None) -> None:
    """Triton version of fastdmd.ops.reference.master_adamw_ (same arguments, same update)."""
    master_adamw_update_(MasterAdamWPlan(masters, exp_avgs, exp_avg_sqs, copies, emas), grads, lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                         ema_weight=ema_weight, skip=skip)


@torch.no_grad()
def master_adamw_update_(plan: MasterAdamWPlan, grads, *, lr, beta1, beta2, eps, weight_decay, step,
                         grad_scale=None, ema_weight=0.0, skip=None) -> None:
    """Triton version of fastdmd.ops.reference.master_adamw_update_ (skip read by each program, not the host)."""
    check_master_adamw_update(grads, plan.shapes, plan.device, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay, step=step, grad_scale=grad_scale, ema_weight=ema_weight,
                              skip=skip, has_exp_avgs=plan.exp_avgs is not None)
    if not len(plan):
        return
    check_kernel_device(_master_adamw_kernel, plan.device)
    _launch_master_adamw(plan, grads, lr, beta1, beta2, eps, weight_decay, step, grad_scale, ema_weight, skip)


def _fixed_table(plan: MasterAdamWPlan):
    """(table [n, 5] int64 on the device, whether all its addresses are 16-byte aligned, numels [n] int64,
    block_rows [programs] int32, block_starts [programs] int64) of the plan's tensors: built once, and again
    only when a master or a copy has new storage (or a test changed BLOCK). Only those are watched: they are
    parameters, which `module.to(...)` or `param.data = ...` can move; the moments and the EMA belong to their
    optimizer and EMA, which replace them only with new tensors, and so with a new plan (one address read
    per watched tensor per update is host time in a host-bound step)."""
    watched = [t.data_ptr() for t in plan.masters] + ([] if plan.copies is None else
                                                      [t.data_ptr() for t in plan.copies])
    derived = plan.derived.get("triton")
    if derived is not None and derived[0] == (BLOCK, watched):
        return derived[1]
    if derived is not None and derived[0][1] != watched:  # new storage under the plan (param.data = ...)
        plan.recheck()
    absent = [0] * len(plan)
    columns = (plan.masters, plan.exp_avgs, plan.exp_avg_sqs, plan.copies, plan.emas)
    addresses = [absent if tensors is None else [t.data_ptr() for t in tensors] for tensors in columns]
    rows = [address for row in zip(*addresses) for address in row]
    aligned = all(address % 16 == 0 for address in rows)  # absent ones are 0
    pinned = plan.device.type == "cuda"  # see the gradients' table in _launch_master_adamw
    table = torch.tensor(rows, dtype=torch.int64, pin_memory=pinned).to(plan.device, non_blocking=True)
    blocks = [triton.cdiv(m.numel(), BLOCK) for m in plan.masters]
    block_rows = torch.repeat_interleave(torch.arange(len(blocks), dtype=torch.int32), torch.tensor(blocks))
    block_starts = torch.cat([torch.arange(b, dtype=torch.int64) * BLOCK for b in blocks])
    numels = torch.tensor([m.numel() for m in plan.masters], dtype=torch.int64)
    on_device = [(t.pin_memory() if pinned else t).to(plan.device, non_blocking=True)
                 for t in (numels, block_rows, block_starts)]
    fixed = (table, aligned, *on_device)
    plan.derived["triton"] = ((BLOCK, watched), fixed)
    return fixed


def _launch_master_adamw(plan: MasterAdamWPlan, grads, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                         ema_weight, skip=None):
    table, aligned, numels, block_rows, block_starts = _fixed_table(plan)
    # A strided gradient is read through a contiguous copy (the table holds addresses); freeing it after the
    # launch is safe: the allocator reuses its memory only for work queued after the kernel on this stream.
    grads = [g.contiguous() for g in grads]
    grad_addresses = [g.data_ptr() for g in grads]
    aligned = aligned and all(address % 16 == 0 for address in grad_addresses)
    # From pinned memory: a copy from pageable memory first waits for all the work queued on the stream
    # (CUDA's rule for pageable host-to-device copies), which would hold the host here until the backward ends.
    grad_table = torch.tensor(grad_addresses, dtype=torch.int64,
                              pin_memory=plan.device.type == "cuda").to(plan.device, non_blocking=True)
    copies = plan.copies
    if skip is not None and skip.dtype != torch.int32:
        skip = skip.to(torch.int32)
    _master_adamw_kernel[(block_rows.numel(),)](
        table, grad_table, numels, block_rows, block_starts, table if grad_scale is None else grad_scale,
        table if skip is None else skip,
        1.0 - lr * weight_decay, beta1, beta2, lr / (1 - beta1**step), math.sqrt(1 - beta2**step), eps,
        float(ema_weight),
        GRAD_DTYPE=_TL_DTYPES[grads[0].dtype], COPY_DTYPE=_TL_DTYPES[copies[0].dtype if copies else torch.bfloat16],
        HAS_COPY=copies is not None, HAS_EMA=plan.emas is not None, HAS_SCALE=grad_scale is not None,
        HAS_SKIP=skip is not None, MOMENT_IS_GRAD=beta1 == 0, HAS_EXP_AVG=plan.exp_avgs is not None,
        ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)
