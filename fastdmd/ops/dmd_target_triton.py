"""Fused DMD target: clean estimates, CFG, normalizer, target, loss and per-sample statistics.

Where it sits: step 3 of every method's generator update (DESIGN.md, "One training step"). The
teacher (with CFG) and the critic have produced raw predictions at x_t; this op turns them and the
generator output x0 into the DMD2 target, the loss whose gradient for x0 is w * grad / N, and the
per-sample statistics GNDM and GDMD consume. The math, and its spec, is
fastdmd.ops.reference.dmd_target; this file is the same thing in three Triton kernels:

  1. _p_real_abs_sum_kernel, one program per (sample, chunk) (forward_chunks): partial sums
     of |p_real| = |x0 - x0_real|. The normalizer mean |p_real| is a full-sample reduction that
     every element of pass 2 needs, hence a split reduction first.
  2. _dmd_elementwise_kernel, same grid, visited in reverse: adds its sample's partial sums into the
     normalizer (every program in the same order, so all agree bit for bit; chunk 0 stores it),
     then grad, target = x0 - grad and the loss residual x0 - target per element, and partial sums
     of grad^2, grad * p_real, p_real^2 and residual^2. Reverse order because pass 1 ended with the
     last samples, whose inputs are the likeliest to still be in L2.
  3. _dmd_finalize_kernel, one program: per-sample grad_sq and cosine, the weighted loss.
  Backward: _dmd_backward_kernel, d x0 = d_loss * w * residual / N.
One launch per pass for the whole batch. Launching passes 1-2 per group of samples sized to fit
in L2 (so that pass 2 re-reads from L2) was measured slower on an H100: 142 us against 123 us at
bf16 64x16x128x128, 42 against 33 us on the video shape (benchmarks/results/gpu_h100_2026-11-26.md).
_dmd_one_pass_kernel fuses passes 1 and 2: each program publishes its chunk's partial sum, waits
on its sample's arrival counter, then runs pass 2 on the chunk it has just read (L2 hits whatever
the batch size): 6E per element from DRAM in forward. Keeping a one-block chunk's inputs in
registers across the wait instead (no L2 re-read; 48-58 registers per thread against 39-48) was
measured slower on an H100 (bf16 64x16x128x128 forward 125.0 against 117.7 us, forward+backward
225.1 against 209.3; 2026-11-26, session 12) and removed. The same helpers compute both, so its results
are the two-pass results bit for bit (tested on an H100). The launcher takes it where pass 2 of two
passes would miss L2 (one_pass_enabled); where the batch fits in L2 anyway its waits only cost. On an
H100 (benchmarks/results/gpu_h100_2026-11-26_second.md), from CUDA graphs, one pass against two:
bf16 64x16x128x128 forward 116.8 against 122.7 us, forward+backward 208.8 against 230.5; fp32 182.9
against 230.8 and 314.3 against 364.0; but bf16 8x16x128x128 (17 MB, in L2) 21.2 against 16.4 us.

Bytes per element, E = input element size (2 for bf16), one more E per pass with the noise term:
  pass 1 reads x0, x_t, real_cond, real_uncond                                     4E
  pass 2 reads x0, x_t, real_cond, real_uncond, fake                              5E (L2 hits
         when the pass-1 working set B*M*4E fits in L2, 50 MB on H100; partly beyond),
         writes target (x0's dtype) E and, when x0 requires grad, the fp32 residual 4
  backward reads the residual 4, writes d x0 E
  bf16 training step: 24 B/element from DRAM at worst, 14 when pass 2 hits L2, plus 6 in backward.
  Any implementation must at least read the 5 inputs and write the target: 6E = 12 B/element.

Memory choice for backward: the residual x0 - target is saved in fp32 (4 bytes per element; a
64x16x128x128 batch: 64 MiB, small next to the generator's activations). Recomputing it in backward
would keep the teacher and critic outputs alive (5E per element) and re-read them; saving it in
bf16 would round the gradient twice. It is only written when x0 requires grad.

Inputs of any [B, ...] shape and of dtypes bf16/fp16/fp32 (mixed is fine: each pointer is loaded
in its own dtype and upcast); non-contiguous inputs are copied to contiguous ones by the launcher.
All arithmetic and accumulation is fp32.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdmd.ops.checks import KERNEL_DTYPES, check_dmd_target_inputs, check_kernel_device, interpreted
from fastdmd.ops.op_contracts import (
    dmd_target_backward, dmd_target_backward_fake, dmd_target_constants, dmd_target_fake, dmd_target_setup_context,
)
from fastdmd.ops.reference import DMDTarget
from fastdmd.ops.sample_chunks import sample_chunks

# Partial sums written by pass 2, one row each: grad^2, grad * p_real, p_real^2, residual^2.
_STATS = 4
# Finalize tile: samples x partial sums held at once by the single finalize program.
_FINALIZE_TILE = 4096
# One launch for passes 1 and 2 (_dmd_one_pass_kernel) instead of two: None chooses by size
# (one_pass_enabled); True or False forces it wherever it fits, or never (benchmarks and tests).
ONE_PASS: Optional[bool] = None
# The forward's chunks are at least MIN_CHUNK_ELEMENT_BYTES // E blocks long (E: x0's element size), so that
# each reads as many bytes per input as one fp32 block: two blocks for bf16 and fp16, one for fp32. A one-pass
# program waits once per chunk, and a longer chunk spreads that wait over more bytes: on an H100, bf16
# 64x16x128x128 forward 107.5 us with 64 chunks of 2 blocks against 117.7 with 128 of one (fp32: 187 us either
# way; 2026-11-26, session 12); 106.0 against 119.1 (2026-11-27, session 19). A forward that saves the residual
# for backward (x0 requires grad: every training step) takes MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL instead:
# one-block chunks, since there the longer chunks lost: forward+backward 228.4 us against 209.8 with one block
# (same shape, same run; benchmarks/results/gpu_h100_2026-11-27_sixth.md). The backward, a plain elementwise
# pass, keeps one-block chunks: there fewer, longer programs were slower. 0: one-block chunks.
MIN_CHUNK_ELEMENT_BYTES = 4
MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL = 0
# The one-pass kernel's wait gives up after this many polls of its sample's counter (about a second):
# a wait that cannot end (a GPU that broke the residency argument of one_pass_enabled) then shows as
# a NaN loss, which the trainer refuses as a non-finite update, instead of a hung process.
_MAX_POLLS = 1 << 20


@triton.jit
def _real_clean_estimate(offset, mask, x_t_ptr, cond_ptr, uncond_ptr, noise_ptr, a, b, c,
                         guidance_scale, HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr):
    """base = a * x_t (+ c * noise), shared by both clean estimates, and x0_real = base + b * CFG."""
    base = a * tl.load(x_t_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        base = base + c * tl.load(noise_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    real = tl.load(cond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        uncond = tl.load(uncond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        real = uncond + guidance_scale * (real - uncond)
    return base, base + b * real


@triton.jit
def _abs_p_real_chunk_sum(x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, noise_ptr, a, b, c, sample_start, chunk,
                          numel_per_sample, guidance_scale, HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr):
    """Pass 1 of one (sample, chunk): the sum of |x0 - x0_real| over the chunk."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(BLOCKS_PER_CHUNK):
        index = (chunk * BLOCKS_PER_CHUNK + i) * BLOCK + tl.arange(0, BLOCK)
        mask = index < numel_per_sample
        offset = sample_start + index
        x0 = tl.load(x0_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        _, x0_real = _real_clean_estimate(offset, mask, x_t_ptr, cond_ptr, uncond_ptr, noise_ptr,
                                          a, b, c, guidance_scale, HAS_UNCOND, HAS_NOISE)
        total += tl.where(mask, tl.abs(x0 - x0_real), 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _dmd_chunk(x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, fake_ptr, noise_ptr, target_ptr, residual_ptr,
               stat_partials_ptr, normalizer, a, b, c, sample_start, chunk, pid, numel_per_sample,
               guidance_scale, HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr,
               SAVE_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr):
    """Pass 2 of one (sample, chunk), given its sample's normalizer: target (and residual) stores,
    and the chunk's partial sums of grad^2, grad * p_real, p_real^2, residual^2 in row `pid`."""
    grad_sq = tl.zeros([BLOCK], dtype=tl.float32)
    grad_dot_p = tl.zeros([BLOCK], dtype=tl.float32)
    p_sq = tl.zeros([BLOCK], dtype=tl.float32)
    residual_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(BLOCKS_PER_CHUNK):
        index = (chunk * BLOCKS_PER_CHUNK + i) * BLOCK + tl.arange(0, BLOCK)
        mask = index < numel_per_sample
        offset = sample_start + index
        x0 = tl.load(x0_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        base, x0_real = _real_clean_estimate(offset, mask, x_t_ptr, cond_ptr, uncond_ptr, noise_ptr,
                                             a, b, c, guidance_scale, HAS_UNCOND, HAS_NOISE)
        x0_fake = base + b * tl.load(fake_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        p_real = x0 - x0_real
        grad = (x0_fake - x0_real) / normalizer
        grad = tl.where(tl.abs(grad) < float("inf"), grad, 0.0)
        target = x0 - grad
        # The loss is 0.5 * w * (x0 - target)^2 as in the reference: equal to grad^2 up to rounding,
        # but NaN where x0 is not finite, so a diverged generator shows in the loss.
        residual = x0 - target
        tl.store(target_ptr + offset, target.to(target_ptr.dtype.element_ty), mask=mask)
        if SAVE_RESIDUAL:
            tl.store(residual_ptr + offset, residual, mask=mask)
        p_finite = tl.where(mask & (tl.abs(p_real) < float("inf")), p_real, 0.0)
        grad = tl.where(mask, grad, 0.0)
        grad_sq += grad * grad
        grad_dot_p += grad * p_finite
        p_sq += p_finite * p_finite
        residual_sq += tl.where(mask, residual * residual, 0.0)
    stride = tl.num_programs(0)
    tl.store(stat_partials_ptr + 0 * stride + pid, tl.sum(grad_sq, axis=0))
    tl.store(stat_partials_ptr + 1 * stride + pid, tl.sum(grad_dot_p, axis=0))
    tl.store(stat_partials_ptr + 2 * stride + pid, tl.sum(p_sq, axis=0))
    tl.store(stat_partials_ptr + 3 * stride + pid, tl.sum(residual_sq, axis=0))


@triton.jit
def _sample_normalizer(abs_partials_ptr, sample, num_chunks, numel_per_sample, eps,
                       PARTIALS_BLOCK: tl.constexpr, VOLATILE: tl.constexpr):
    """mean |p_real| + eps of `sample` from its chunks' partial sums, added in the same order by
    every program (all agree bit for bit)."""
    slots = tl.arange(0, PARTIALS_BLOCK)
    abs_partials = tl.load(abs_partials_ptr + sample * num_chunks + slots, mask=slots < num_chunks,
                           other=0.0, volatile=VOLATILE)
    return tl.sum(abs_partials, axis=0) / numel_per_sample + eps


@triton.jit
def _p_real_abs_sum_kernel(
    x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, noise_ptr, a_ptr, b_ptr, c_ptr, abs_partials_ptr,
    numel_per_sample, num_chunks, guidance_scale,
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // num_chunks
    c = 0.0
    if HAS_NOISE:
        c = tl.load(c_ptr + sample)
    partial = _abs_p_real_chunk_sum(
        x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, noise_ptr, tl.load(a_ptr + sample), tl.load(b_ptr + sample), c,
        sample.to(tl.int64) * numel_per_sample, pid % num_chunks, numel_per_sample, guidance_scale,
        HAS_UNCOND, HAS_NOISE, BLOCK, BLOCKS_PER_CHUNK)
    tl.store(abs_partials_ptr + pid, partial)


@triton.jit
def _dmd_elementwise_kernel(
    x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, fake_ptr, noise_ptr, a_ptr, b_ptr, c_ptr,
    abs_partials_ptr, target_ptr, residual_ptr, normalizer_ptr, stat_partials_ptr,
    numel_per_sample, num_chunks, guidance_scale, eps,
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, SAVE_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    sample = pid // num_chunks
    chunk = pid % num_chunks
    normalizer = _sample_normalizer(abs_partials_ptr, sample, num_chunks, numel_per_sample, eps,
                                    PARTIALS_BLOCK, False)
    if chunk == 0:
        tl.store(normalizer_ptr + sample, normalizer)
    c = 0.0
    if HAS_NOISE:
        c = tl.load(c_ptr + sample)
    _dmd_chunk(x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, fake_ptr, noise_ptr, target_ptr, residual_ptr,
               stat_partials_ptr, normalizer, tl.load(a_ptr + sample), tl.load(b_ptr + sample), c,
               sample.to(tl.int64) * numel_per_sample, chunk, pid, numel_per_sample, guidance_scale,
               HAS_UNCOND, HAS_NOISE, SAVE_RESIDUAL, BLOCK, BLOCKS_PER_CHUNK)


@triton.jit
def _dmd_one_pass_kernel(
    x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, fake_ptr, noise_ptr, a_ptr, b_ptr, c_ptr,
    abs_partials_ptr, arrivals_ptr, ticket_ptr, target_ptr, residual_ptr, normalizer_ptr, stat_partials_ptr,
    numel_per_sample, num_chunks, guidance_scale, eps,
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, SAVE_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
    MAX_POLLS: tl.constexpr,
):
    """Passes 1 and 2 in one launch: after its pass 1 a program waits until every chunk of its
    sample has published its partial sum (a per-sample arrival counter), then runs pass 2 on the
    chunk it has just read, which is still in L2. CUDA only, and only where a sample's programs can
    all be resident at once (one_pass_enabled), which the interpreter, running programs one after
    another, never gives.

    A program takes its work from a ticket counter, not from its program id: tickets go out in the
    order programs start, so every sample but the one holding the newest tickets has all its
    programs started, and only that sample's programs (fewer than one_pass_enabled's bound) can be
    waiting. The wait cannot then block the programs it waits for, whatever order the GPU starts
    programs in."""
    pid = tl.atomic_add(ticket_ptr, 1, sem="relaxed", scope="gpu")
    sample = pid // num_chunks
    chunk = pid % num_chunks
    a = tl.load(a_ptr + sample)
    b = tl.load(b_ptr + sample)
    c = 0.0
    if HAS_NOISE:
        c = tl.load(c_ptr + sample)
    sample_start = sample.to(tl.int64) * numel_per_sample
    partial = _abs_p_real_chunk_sum(x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, noise_ptr, a, b, c, sample_start,
                                    chunk, numel_per_sample, guidance_scale, HAS_UNCOND, HAS_NOISE, BLOCK,
                                    BLOCKS_PER_CHUNK)
    tl.store(abs_partials_ptr + pid, partial)
    # Publish (CUTLASS's semaphore pattern): every thread's store done, then one release increment;
    # wait: acquire reads of the counter, then a barrier before any thread reads the partials.
    tl.debug_barrier()
    # acq_rel, not release: the last program to arrive skips the wait and reads the others' partials
    # right after this increment, so it must acquire too.
    arrived = tl.atomic_add(arrivals_ptr + sample, 1, sem="acq_rel", scope="gpu") + 1
    polls = 0
    while (arrived < num_chunks) & (polls < MAX_POLLS):
        # Triton (3.6 and 3.9) emits this add of 0 as a plain acquire load (ld.global.gpu.acquire),
        # not a read-modify-write: the waits do not contend with the arrivals' increments.
        arrived = tl.atomic_add(arrivals_ptr + sample, 0, sem="acquire", scope="gpu")
        polls += 1
    tl.debug_barrier()
    normalizer = _sample_normalizer(abs_partials_ptr, sample, num_chunks, numel_per_sample, eps,
                                    PARTIALS_BLOCK, True)
    if chunk == 0:
        tl.store(normalizer_ptr + sample, normalizer)
    _dmd_chunk(x0_ptr, x_t_ptr, cond_ptr, uncond_ptr, fake_ptr, noise_ptr, target_ptr, residual_ptr,
               stat_partials_ptr, normalizer, a, b, c, sample_start, chunk, pid, numel_per_sample,
               guidance_scale, HAS_UNCOND, HAS_NOISE, SAVE_RESIDUAL, BLOCK, BLOCKS_PER_CHUNK)
    if arrived < num_chunks:  # gave up waiting: the normalizer may lack chunks, so poison what it fed
        tl.debug_barrier()  # after _dmd_chunk's own stores of these slots
        for k in tl.static_range(4):  # grad^2, grad.p, p^2, residual^2: the statistics and the loss
            tl.store(stat_partials_ptr + k * tl.num_programs(0) + pid, float("nan"))
        if chunk == 0:
            tl.store(normalizer_ptr + sample, float("nan"))


@triton.jit
def _dmd_finalize_kernel(
    stat_partials_ptr, weights_ptr, grad_sq_ptr, cosine_ptr, residual_sq_sum_ptr, loss_ptr,
    batch, num_chunks, numel_per_sample, numel,
    HAS_WEIGHTS: tl.constexpr, SAMPLES_BLOCK: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
):
    # One program, so the loss needs no atomics and is reproducible. The tile shape depends on
    # num_chunks only, so a sample's statistics do not depend on the batch size either.
    slots = tl.arange(0, PARTIALS_BLOCK)
    stride = batch * num_chunks
    weighted_residual_sq = 0.0
    first = 0
    while first < batch:  # not range(0, batch, ...): triton 3.6's interpreter cannot take a runtime bound there
        samples = first + tl.arange(0, SAMPLES_BLOCK)
        in_batch = samples < batch
        index = samples[:, None] * num_chunks + slots[None, :]
        mask = in_batch[:, None] & (slots[None, :] < num_chunks)
        grad_sq = tl.sum(tl.load(stat_partials_ptr + 0 * stride + index, mask=mask, other=0.0), axis=1)
        grad_dot_p = tl.sum(tl.load(stat_partials_ptr + 1 * stride + index, mask=mask, other=0.0), axis=1)
        p_sq = tl.sum(tl.load(stat_partials_ptr + 2 * stride + index, mask=mask, other=0.0), axis=1)
        residual_sq = tl.sum(tl.load(stat_partials_ptr + 3 * stride + index, mask=mask, other=0.0), axis=1)
        cosine = grad_dot_p / tl.maximum(tl.sqrt(grad_sq) * tl.sqrt(p_sq), 1e-12)
        tl.store(grad_sq_ptr + samples, grad_sq / numel_per_sample, mask=in_batch)
        tl.store(cosine_ptr + samples, cosine, mask=in_batch)
        tl.store(residual_sq_sum_ptr + samples, residual_sq, mask=in_batch)
        if HAS_WEIGHTS:
            residual_sq = residual_sq * tl.load(weights_ptr + samples, mask=in_batch, other=0.0)
        weighted_residual_sq += tl.sum(tl.where(in_batch, residual_sq, 0.0), axis=0)
        first += SAMPLES_BLOCK
    tl.store(loss_ptr, 0.5 * weighted_residual_sq / numel)


@triton.jit
def _dmd_backward_kernel(
    residual_ptr, d_loss_ptr, weights_ptr, d_x0_ptr, numel_per_sample, num_chunks, inv_numel,
    HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    sample = pid // num_chunks
    chunk = pid % num_chunks
    scale = tl.load(d_loss_ptr).to(tl.float32) * inv_numel
    if HAS_WEIGHTS:
        scale = scale * tl.load(weights_ptr + sample)
    sample_start = sample.to(tl.int64) * numel_per_sample
    for i in range(BLOCKS_PER_CHUNK):
        index = (chunk * BLOCKS_PER_CHUNK + i) * BLOCK + tl.arange(0, BLOCK)
        mask = index < numel_per_sample
        residual = tl.load(residual_ptr + sample_start + index, mask=mask, other=0.0)
        tl.store(d_x0_ptr + sample_start + index, (scale * residual).to(d_x0_ptr.dtype.element_ty),
                 mask=mask)


def one_pass_fits(device: torch.device, num_chunks: int) -> bool:
    """Whether the one-pass kernel can run: CUDA, not the interpreter, and at most one program per SM
    in a sample: the programs that can be waiting (one sample's, see _dmd_one_pass_kernel) then
    never fill the GPU, so the programs they wait for can start."""
    return (device.type == "cuda" and not interpreted(_dmd_one_pass_kernel)
            and num_chunks <= torch.cuda.get_device_properties(device).multi_processor_count)


def one_pass_enabled(device: torch.device, num_chunks: int, pass_one_bytes: int) -> bool:
    """Whether the launcher takes the one-pass kernel, where it fits: by ONE_PASS if set, else when
    what pass 1 reads (pass_one_bytes) exceeds the GPU's L2, so that two passes would read it twice
    from DRAM."""
    if ONE_PASS is not None:
        return ONE_PASS and one_pass_fits(device, num_chunks)
    return one_pass_fits(device, num_chunks) and pass_one_bytes > torch.cuda.get_device_properties(device).L2_cache_size


def forward_chunks(numel_per_sample: int, element_size: int, save_residual: bool):
    """The forward's cut of a sample (passes 1 and 2, one or two launches alike, so their sums agree bit
    for bit): sample_chunks with chunks of at least MIN_CHUNK_ELEMENT_BYTES // element_size blocks, or
    MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL's where the forward saves the residual. It depends on the
    sample's size and dtype and on save_residual, never on the batch; a forward with grad and one without
    may differ in their sums' last bits."""
    min_bytes = MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL if save_residual else MIN_CHUNK_ELEMENT_BYTES
    return sample_chunks(numel_per_sample, max(1, min_bytes // element_size))


def _per_sample_fp32(t: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """[B] coefficients as contiguous fp32; a placeholder pointer for an absent optional input."""
    return placeholder if t is None else t.to(torch.float32).contiguous()


def _launch_dmd_target(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights, noise,
                       c, eps, save_residual, one_pass: Optional[bool] = None):
    """The kernels' launches; one_pass None: one_pass_enabled (compile_check forces either)."""
    batch = x0.shape[0]
    numel_per_sample = x0.numel() // batch
    chunks = forward_chunks(numel_per_sample, x0.element_size(), save_residual)
    flags = dict(HAS_UNCOND=real_uncond is not None, HAS_NOISE=noise is not None)
    pass_one_bytes = sum(t.numel() * t.element_size() for t in (x0, x_t, real_cond, real_uncond, noise)
                         if t is not None)
    x0, x_t, real_cond, fake = (t.contiguous() for t in (x0, x_t, real_cond, fake))
    # Absent optional tensors are never read (their HAS_ flag is off): x0 stands in as a pointer.
    real_uncond = x0 if real_uncond is None else real_uncond.contiguous()
    noise = x0 if noise is None else noise.contiguous()
    a, b = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
    c = _per_sample_fp32(c, a)
    weights_fp32 = _per_sample_fp32(weights, a)

    fp32 = dict(dtype=torch.float32, device=x0.device)
    num_programs = batch * chunks.num_chunks
    abs_partials = torch.empty(num_programs, **fp32)
    stat_partials = torch.empty(_STATS, num_programs, **fp32)
    target = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    residual = torch.empty(x0.shape if save_residual else (0,), **fp32)
    normalizer, grad_sq, cosine, residual_sq_sum = (torch.empty(batch, **fp32) for _ in range(4))
    loss = torch.empty((), **fp32)

    layout = dict(BLOCK=chunks.block, BLOCKS_PER_CHUNK=chunks.blocks_per_chunk,
                  num_warps=chunks.num_warps)
    if one_pass_enabled(x0.device, chunks.num_chunks, pass_one_bytes) if one_pass is None else one_pass:
        counters = torch.zeros(batch + 1, dtype=torch.int32, device=x0.device)  # arrivals per sample, ticket
        _dmd_one_pass_kernel[(num_programs,)](
            x0, x_t, real_cond, real_uncond, fake, noise, a, b, c, abs_partials, counters[:batch],
            counters[batch:], target, residual, normalizer, stat_partials, numel_per_sample, chunks.num_chunks,
            guidance_scale, eps, **flags, SAVE_RESIDUAL=save_residual, PARTIALS_BLOCK=chunks.partials_block,
            MAX_POLLS=_MAX_POLLS, **layout)
    else:
        _p_real_abs_sum_kernel[(num_programs,)](
            x0, x_t, real_cond, real_uncond, noise, a, b, c, abs_partials,
            numel_per_sample, chunks.num_chunks, guidance_scale, **flags, **layout)
        _dmd_elementwise_kernel[(num_programs,)](
            x0, x_t, real_cond, real_uncond, fake, noise, a, b, c, abs_partials, target, residual,
            normalizer, stat_partials, numel_per_sample, chunks.num_chunks, guidance_scale, eps,
            **flags, SAVE_RESIDUAL=save_residual, PARTIALS_BLOCK=chunks.partials_block, **layout)
    _dmd_finalize_kernel[(1,)](
        stat_partials, weights_fp32, grad_sq, cosine, residual_sq_sum, loss,
        batch, chunks.num_chunks, numel_per_sample, x0.numel(),
        HAS_WEIGHTS=weights is not None, PARTIALS_BLOCK=chunks.partials_block,
        SAMPLES_BLOCK=max(1, _FINALIZE_TILE // chunks.partials_block), num_warps=4)
    return loss, target, normalizer, grad_sq, cosine, residual_sq_sum, residual


@torch.library.custom_op("fastdmd::dmd_target", mutates_args=())
def _dmd_target_op(
    x0: torch.Tensor, x_t: torch.Tensor, real_cond: torch.Tensor, real_uncond: Optional[torch.Tensor],
    fake: torch.Tensor, a: torch.Tensor, b: torch.Tensor, guidance_scale: float,
    weights: Optional[torch.Tensor], noise: Optional[torch.Tensor], c: Optional[torch.Tensor],
    eps: float, save_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(loss, target, normalizer, grad_sq, cosine, residual_sq_sum [B], residual or empty)."""
    return _launch_dmd_target(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights,
                              noise, c, eps, save_residual)


_dmd_target_op.register_fake(dmd_target_fake)


@torch.library.custom_op("fastdmd::dmd_target_backward", mutates_args=())
def _dmd_target_backward_op(residual: torch.Tensor, d_loss: torch.Tensor,
                            weights: Optional[torch.Tensor], x0_dtype: torch.dtype) -> torch.Tensor:
    """d x0 = d_loss * w * residual / N, in x0's dtype."""
    batch = residual.shape[0]
    numel_per_sample = residual.numel() // batch
    chunks = sample_chunks(numel_per_sample)
    d_x0 = torch.empty(residual.shape, dtype=x0_dtype, device=residual.device)
    _dmd_backward_kernel[(batch * chunks.num_chunks,)](
        residual, d_loss, _per_sample_fp32(weights, residual), d_x0, numel_per_sample,
        chunks.num_chunks, 1.0 / residual.numel(), HAS_WEIGHTS=weights is not None,
        BLOCK=chunks.block, BLOCKS_PER_CHUNK=chunks.blocks_per_chunk, num_warps=chunks.num_warps)
    return d_x0


_dmd_target_backward_op.register_fake(dmd_target_backward_fake)
_dmd_target_op.register_autograd(dmd_target_backward(_dmd_target_backward_op),
                                 setup_context=dmd_target_setup_context)


def dmd_target(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    real_cond: torch.Tensor,
    real_uncond: Optional[torch.Tensor],
    fake: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    guidance_scale: float = 1.0,
    weights: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    c: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> DMDTarget:
    """Triton version of fastdmd.ops.reference.dmd_target (same arguments, same result)."""
    check_dmd_target_inputs(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights,
                            noise, c, eps, dtypes=KERNEL_DTYPES)
    check_kernel_device(_dmd_elementwise_kernel, x0.device)
    save_residual = torch.is_grad_enabled() and x0.requires_grad
    x_t, real_cond, real_uncond, fake, a, b, noise, c = dmd_target_constants(x_t, real_cond, real_uncond, fake, a, b,
                                                                              noise, c)
    loss, target, normalizer, grad_sq, cosine, _, _ = _dmd_target_op(
        x0, x_t, real_cond, real_uncond, fake, a, b, float(guidance_scale), weights, noise, c,
        float(eps), save_residual)
    return DMDTarget(loss, target.detach(), normalizer.detach(), grad_sq.detach(), cosine.detach())
