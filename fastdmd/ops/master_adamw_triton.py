"""AdamW on fp32 master weights from bf16 gradients, writing the bf16 compute copy: one launch per step.

Where it sits: the optimizer phase with perf.master_weights (fastdmd.optim.MasterAdamW). The
generator and the critic compute on bf16 copies of their fp32 weights; this kernel reads each copy's
bf16 gradient directly, updates the fp32 weight and its two moments, writes the new weight, rounded,
into the copy the next forward reads, and (generator) moves the EMA. The math, and its spec, is
fastdmd.ops.reference.master_adamw_.

Bytes per parameter: read master 4 + grad 2 + exp_avg 4 + exp_avg_sq 4, write master 4 + exp_avg 4 +
exp_avg_sq 4 + copy 2 = 28, the same as torch's fused AdamW on fp32 gradients; with the EMA 8 more.
Done as separate torch ops the same update moves 28 + 6 (gradient cast to fp32) + 6 (copy refill) +
12 (EMA lerp) = 52. The gradient clipping coefficient is read from the device (grad_scale), so
clipping costs no pass over the gradients either.

Many tensors, one launch: the launcher writes a table with one row per parameter (the addresses of
its master, gradient, moments, copy and EMA, and its size) and a map from program to (row, block);
each program loads its row and casts the addresses to pointers. The map depends on the sizes only
and is cached; the table is rebuilt each call (gradients are new tensors every backward).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdmd.ops.checks import check_kernel_device, check_master_adamw_inputs

# Elements per program: 4 per thread at 8 warps (16-byte loads of the fp32 streams). Compiled for sm_90 this
# takes 40 registers per thread; 8 per thread took 142 (every load hoisted), one program of 256 threads per SM.
BLOCK = 1024
NUM_WARPS = 8
COLUMNS = 6   # master, grad, exp_avg, exp_avg_sq, copy, ema addresses (the absent ones 0)

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _master_adamw_kernel(
    table_ptr, numels_ptr, block_rows_ptr, block_starts_ptr, grad_scale_ptr,
    decay_factor, beta1, beta2, step_size, bias_correction2_sqrt, eps, ema_weight,
    GRAD_DTYPE: tl.constexpr, COPY_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr, HAS_EMA: tl.constexpr,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(block_rows_ptr + pid).to(tl.int64)
    start = tl.load(block_starts_ptr + pid)
    numel = tl.load(numels_ptr + row)
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    entry = table_ptr + row * 6
    master_ptr = tl.load(entry).to(tl.pointer_type(tl.float32))
    grad_ptr = tl.load(entry + 1).to(tl.pointer_type(GRAD_DTYPE))
    exp_avg_ptr = tl.load(entry + 2).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(entry + 3).to(tl.pointer_type(tl.float32))

    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(grad_scale_ptr)
    p = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    p = p * decay_factor
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - step_size * m / denom
    tl.store(master_ptr + offsets, p, mask=mask)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    if HAS_COPY:
        copy_ptr = tl.load(entry + 4).to(tl.pointer_type(COPY_DTYPE))
        tl.store(copy_ptr + offsets, p.to(COPY_DTYPE), mask=mask)
    if HAS_EMA:
        ema_ptr = tl.load(entry + 5).to(tl.pointer_type(tl.float32))
        ema = tl.load(ema_ptr + offsets, mask=mask, other=0.0)
        # torch.lerp's two forms (which it picks by the weight), so the EMA matches _foreach_lerp_'s bits
        if ema_weight < 0.5:
            ema = ema + ema_weight * (p - ema)
        else:
            ema = p - (p - ema) * (1.0 - ema_weight)
        tl.store(ema_ptr + offsets, ema, mask=mask)


_block_maps: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _block_map(numels: tuple[int, ...], block: int, device: torch.device):
    """(numels [n] int64, block_rows [programs] int32, block_starts [programs] int64) for these sizes."""
    key = (numels, block, device)
    if key not in _block_maps:
        blocks = [triton.cdiv(n, block) for n in numels]
        rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(blocks))
        starts = torch.cat([torch.arange(b, dtype=torch.int64) * block for b in blocks])
        if len(_block_maps) >= 8:  # a few optimizers (generator, critic) alternate: keep theirs, drop the oldest
            del _block_maps[next(iter(_block_maps))]
        _block_maps[key] = (torch.tensor(numels, dtype=torch.int64).to(device), rows.to(device), starts.to(device))
    return _block_maps[key]


@torch.no_grad()
def master_adamw_(masters, grads, exp_avgs, exp_avg_sqs, copies, *, lr, beta1, beta2, eps, weight_decay, step,
                  grad_scale=None, emas=None, ema_weight=0.0) -> None:
    """Triton version of fastdmd.ops.reference.master_adamw_ (same arguments, same update)."""
    check_master_adamw_inputs(masters, grads, exp_avgs, exp_avg_sqs, copies, emas, lr=lr, beta1=beta1, beta2=beta2,
                              eps=eps, weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                              ema_weight=ema_weight)
    if not masters:
        return
    check_kernel_device(_master_adamw_kernel, masters[0].device)
    _launch_master_adamw(masters, grads, exp_avgs, exp_avg_sqs, copies, lr, beta1, beta2, eps, weight_decay, step,
                         grad_scale, emas, ema_weight)


def _launch_master_adamw(masters, grads, exp_avgs, exp_avg_sqs, copies, lr, beta1, beta2, eps, weight_decay, step,
                         grad_scale, emas, ema_weight):
    device = masters[0].device
    # A strided gradient is read through a contiguous copy (the table holds addresses); freeing it after the
    # launch is safe: the allocator reuses its memory only for work queued after the kernel on this stream.
    grads = [g.contiguous() for g in grads]
    rows = []
    for i, master in enumerate(masters):
        rows.extend((master.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                     0 if copies is None else copies[i].data_ptr(), 0 if emas is None else emas[i].data_ptr()))
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    numels, block_rows, block_starts = _block_map(tuple(m.numel() for m in masters), BLOCK, device)
    _master_adamw_kernel[(block_rows.numel(),)](
        table, numels, block_rows, block_starts, table if grad_scale is None else grad_scale,
        1.0 - lr * weight_decay, beta1, beta2, lr / (1 - beta1**step), math.sqrt(1 - beta2**step), eps,
        float(ema_weight),
        GRAD_DTYPE=_TL_DTYPES[grads[0].dtype], COPY_DTYPE=_TL_DTYPES[copies[0].dtype if copies else torch.bfloat16],
        HAS_COPY=copies is not None, HAS_EMA=emas is not None, HAS_SCALE=grad_scale is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS)
