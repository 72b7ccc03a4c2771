"""How the Triton kernels cut a [B, M] batch into per-sample chunks for split reductions.

A per-sample reduction (mean |p_real| in dmd_target, sum (x - mean)^2 in clipped_policy_loss) runs
as one program per (sample, chunk): each program reduces `blocks_per_chunk` blocks of `block`
elements to one partial sum, and a later pass adds a sample's `num_chunks` partials. The cut
depends on M only, never on B, so the reduction order of a sample, hence its result bit for bit,
does not depend on the batch it sits in: a log-prob computed during the rollout with batch 16
equals the one recomputed for training with batch 2, and on-policy ratios are exactly 1.
"""

from __future__ import annotations

from typing import NamedTuple

import triton

# Tuning knobs, read at every launch (tests shrink them to exercise multi-chunk loops on tiny
# inputs). 2048 elements with 8 warps = 8 per thread: one 16-byte load per bf16 tensor.
BLOCK = 2048
# At most this many chunks per sample: every elementwise program re-reads its sample's partial
# sums, so this bounds that extra traffic (256 floats = 1 KiB against >= 2048 elements * 5 inputs)
# while still giving B * 256 programs to fill the GPU.
MAX_CHUNKS = 256


class SampleChunks(NamedTuple):
    block: int             # elements per loop iteration of a program (power of two)
    blocks_per_chunk: int  # loop iterations of a program
    num_chunks: int        # programs per sample
    partials_block: int    # power of two >= num_chunks: a sample's partial sums, read at once
    num_warps: int


def sample_chunks(numel_per_sample: int, min_blocks_per_chunk: int = 1) -> SampleChunks:
    """The cut of one sample: chunks of whole blocks, at most MAX_CHUNKS of them, each of at least
    `min_blocks_per_chunk` blocks where the sample has that many."""
    block = min(BLOCK, triton.next_power_of_2(numel_per_sample))
    blocks = triton.cdiv(numel_per_sample, block)
    blocks_per_chunk = min(blocks, max(triton.cdiv(blocks, MAX_CHUNKS), min_blocks_per_chunk))
    num_chunks = triton.cdiv(blocks, blocks_per_chunk)
    num_warps = max(1, min(8, block // 256))
    return SampleChunks(block, blocks_per_chunk, num_chunks, triton.next_power_of_2(num_chunks),
                        num_warps)
