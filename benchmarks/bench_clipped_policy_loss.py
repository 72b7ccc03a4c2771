"""Benchmark of the clipped policy loss (fastdmd/ops/clipped_policy_loss_triton.py) against its
reference, eager and compiled, on the same inputs (one SDE step of a latent sampler).

Bytes the op must move, E = element size of x_prev and mean, n = elements of x_prev:
  forward             read x_prev, mean                                  2 E n
  forward+backward    + read x_prev, mean again, write d mean            5 E n
The per-sample tensors (std, old log-probs, advantages, outputs) are B floats: not counted.

    python benchmarks/bench_clipped_policy_loss.py   # --full with CUDA, --small without
"""

import torch

from _bench_common import ALL_GRAPHABLE, parse_args, run_benchmark
from fastdmd.ops import reference

FULL_SHAPES = {"image_8x16x128x128": (8, 16, 128, 128), "image_64x16x128x128": (64, 16, 128, 128),
               "video_2x336x60x104": (2, 336, 60, 104)}
SMALL_SHAPES = {"small_2x4x32x32": (2, 4, 32, 32)}
DTYPES = (torch.bfloat16, torch.float32)
BYTES_PER_ELEMENT = {"forward": 2, "forward+backward": 5}  # in units of E, see above


def make_inputs(shape, dtype, device, requires_grad):
    batch = shape[0]
    std = 0.05 + 0.45 * torch.rand(batch, device=device)
    mean = torch.randn(shape, device=device)
    x_prev = mean + std.reshape(-1, *[1] * (len(shape) - 1)) * torch.randn_like(mean)
    return dict(x_prev=x_prev.to(dtype), mean=mean.to(dtype).requires_grad_(requires_grad), std=std,
                old_log_prob=torch.full((batch,), 0.5, device=device),
                advantages=torch.randn(batch, device=device), clip_range=0.2)


def cases(args):
    for shape_name, shape in (SMALL_SHAPES if args.small else FULL_SHAPES).items():
        for dtype in DTYPES:
            for mode, bytes_per_element in BYTES_PER_ELEMENT.items():
                inputs = make_inputs(shape, dtype, args.device, requires_grad=mode != "forward")

                def call(impl, inputs=inputs, mode=mode):
                    if mode == "forward":
                        return lambda: impl(**inputs)
                    return lambda: torch.autograd.grad(impl(**inputs).loss.sum(), inputs["mean"])

                fields = dict(shape=shape_name, dtype=str(dtype).removeprefix("torch."), mode=mode)
                nbytes = bytes_per_element * dtype.itemsize * inputs["x_prev"].numel()
                yield fields, call, nbytes, ALL_GRAPHABLE


if __name__ == "__main__":
    args = parse_args(__doc__)
    run_benchmark(args, reference.clipped_policy_loss, cases(args),
                  ["bytes = 2 E n (forward), 5 E n (forward+backward); E = element size, n = x_prev.numel()"])
