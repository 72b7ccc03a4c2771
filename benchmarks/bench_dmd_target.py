"""Benchmark of the fused DMD target (fastdmd/ops/dmd_target_triton.py) against its reference,
eager and compiled, on the same inputs: CFG (guidance 4.5) and per-sample weights, as in training.

Bytes the op must move, E = element size of the inputs, n = elements of x0:
  forward             read x0, x_t, real_cond, real_uncond, fake; write target      6 E n
  forward+backward    + read one saved per-element tensor, write d x0 (>= E each)    8 E n
The Triton kernel moves more than this minimum (its second pass re-reads the inputs, from L2
when they fit, and training saves an fp32 residual: see the kernel's docstring), so its fraction
of copy bandwidth is measured against what a perfect one-pass implementation would move.

    python benchmarks/bench_dmd_target.py            # --full with CUDA, --small without
"""

import torch

from _bench_common import ALL_GRAPHABLE, parse_args, run_benchmark
from fastdmd.ops import dmd_target_triton, reference, sample_chunks

# The target shape first: a run cut short by a time limit still has it.
FULL_SHAPES = {"image_64x16x128x128": (64, 16, 128, 128), "image_8x16x128x128": (8, 16, 128, 128),
               "video_2x336x60x104": (2, 336, 60, 104)}
SMALL_SHAPES = {"small_2x4x32x32": (2, 4, 32, 32)}
DTYPES = (torch.bfloat16, torch.float32)
BYTES_PER_ELEMENT = {"forward": 6, "forward+backward": 8}  # in units of E, see above


def make_inputs(shape, dtype, device, requires_grad):
    def latent():
        return torch.randn(shape, device=device, dtype=dtype)

    def per_sample():
        return torch.rand(shape[0], device=device)

    return dict(x0=latent().requires_grad_(requires_grad), x_t=latent(), real_cond=latent(),
                real_uncond=latent(), fake=latent(), a=per_sample(), b=-per_sample(),
                guidance_scale=4.5, weights=per_sample())


def cases(args):
    for shape_name, shape in (SMALL_SHAPES if args.small else FULL_SHAPES).items():
        for dtype in DTYPES:
            for mode, bytes_per_element in BYTES_PER_ELEMENT.items():
                inputs = make_inputs(shape, dtype, args.device, requires_grad=mode != "forward")

                def call(impl, inputs=inputs, mode=mode):
                    if mode == "forward":
                        return lambda: impl(**inputs)
                    return lambda: torch.autograd.grad(impl(**inputs).loss, inputs["x0"])

                fields = dict(shape=shape_name, dtype=str(dtype).removeprefix("torch."), mode=mode)
                nbytes = bytes_per_element * dtype.itemsize * inputs["x0"].numel()
                yield fields, call, nbytes, ALL_GRAPHABLE | set(KERNEL_VARIANTS)


def forced_passes(one_pass: bool, max_chunks: int | None = None, min_chunk_element_bytes: int | None = None):
    """The kernel with passes 1 and 2 in one launch, or in two, whatever the launcher would choose
    (dmd_target_triton.one_pass_enabled); an error (recorded in the row) where one pass cannot run.
    max_chunks: at most this many programs per sample, forward and backward (sample_chunks.MAX_CHUNKS);
    min_chunk_element_bytes: the forward's chunk length, with and without the residual saved
    (dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES and MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL alike).
    Other chunks change the order of a sample's sums, hence its last bits."""
    def variant(kernel):
        def run(**inputs):
            saved = (dmd_target_triton.ONE_PASS, sample_chunks.MAX_CHUNKS, dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES,
                     dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL)
            dmd_target_triton.ONE_PASS = one_pass
            sample_chunks.MAX_CHUNKS = max_chunks or sample_chunks.MAX_CHUNKS
            if min_chunk_element_bytes is not None:
                dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES = min_chunk_element_bytes
                dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL = min_chunk_element_bytes
            try:
                x0 = inputs["x0"]
                save_residual = torch.is_grad_enabled() and x0.requires_grad
                chunks = dmd_target_triton.forward_chunks(x0[0].numel(), x0.element_size(), save_residual).num_chunks
                if one_pass and not dmd_target_triton.one_pass_fits(x0.device, chunks):
                    raise RuntimeError(f"one pass does not apply: {chunks} programs per sample, more than this "
                                       "GPU's SMs")
                return kernel(**inputs)
            finally:
                (dmd_target_triton.ONE_PASS, sample_chunks.MAX_CHUNKS, dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES,
                 dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL) = saved
        return run
    return variant


# The launcher's choice, both forced choices, the forward's chunks one block long with and without the
# residual saved (the layout before MIN_CHUNK_ELEMENT_BYTES, 2026-11-27: an image latent's 128 per sample),
# and two bf16 blocks long with and without (session 15's layout, before the residual-saving forward went
# back to one block: 64 per sample), and fewer programs per sample, forward and backward: fewer, longer
# programs wait less in one pass, but the chunks their pass 2 re-reads from L2 are larger (all resident
# programs' pass-1 chunks must stay in L2), and the backward loses parallelism; the video latent's one
# pass fits the SMs with them.
KERNEL_VARIANTS = {
    "triton_one_pass": forced_passes(True),
    "triton_two_pass": forced_passes(False),
    "triton_one_pass_one_block_chunks": forced_passes(True, min_chunk_element_bytes=0),
    "triton_one_pass_two_block_chunks": forced_passes(True, min_chunk_element_bytes=4),
    "triton_one_pass_32_chunks": forced_passes(True, max_chunks=32),
    "triton_two_pass_32_chunks": forced_passes(False, max_chunks=32),
}


if __name__ == "__main__":
    args = parse_args(__doc__)
    run_benchmark(args, reference.dmd_target, cases(args),
                  ["bytes = 6 E n (forward), 8 E n (forward+backward); E = element size, n = x0.numel()",
                   "triton: the launcher's choice; triton_one_pass: passes 1 and 2 in one launch, a per-sample "
                   "barrier between them; triton_two_pass: two launches; _one_block_chunks / _two_block_chunks: "
                   "the forward's chunks one block / two bf16 blocks long, residual saved or not; _32_chunks: at "
                   "most 32 programs per sample, forward and backward, not 256"],
                  kernel_variants=KERNEL_VARIANTS)
