"""Benchmark of the group advantages (fastdmd/ops/group_advantages_triton.py) against its
reference, eager and compiled, on N=1024 samples scored by K=4 reward models.

The op is tiny (launch-latency bound), so the number that matters is the time: the target on an
H100 is under 15 us for the kernel. Bytes it must move, G groups: read the N x K rewards (E each),
write N fp32 advantages, N bool valid flags and the G x K fp32 means and stds.
Layouts: contiguous groups of 16 (group_size), and 64 groups given by shuffled ids (group_ids:
the launcher sorts the ids first, which costs a few more launches and one synchronization).

    python benchmarks/bench_group_advantages.py      # --full with CUDA, --small without
"""

import torch

from _bench_common import parse_args, run_benchmark
from fastdmd.ops import reference

NUM_SAMPLES, NUM_REWARDS, GROUP_SIZE = 1024, 4, 16


def cases(args):
    num_groups = NUM_SAMPLES // GROUP_SIZE
    ids = torch.randperm(NUM_SAMPLES, device=args.device) % num_groups
    for layout_name, layout in {"group_size": dict(group_size=GROUP_SIZE),
                                "group_ids": dict(group_ids=ids)}.items():
        rewards = torch.randn(NUM_SAMPLES, NUM_REWARDS, device=args.device)
        weights = torch.tensor([1.0, 0.5, 0.25, 2.0], device=args.device)

        def call(impl, rewards=rewards, layout=layout, weights=weights):
            return lambda: impl(rewards, weights=weights, clip=5.0, **layout)

        nbytes = NUM_SAMPLES * (NUM_REWARDS * 4 + 4 + 1) + 2 * num_groups * NUM_REWARDS * 4
        # The references size their outputs from the data (bincount, unique), as does the kernel's
        # group_ids launcher: only the kernel with contiguous groups runs inside a CUDA graph.
        graphable = {"triton"} if layout_name == "group_size" else set()
        yield (dict(shape=f"{NUM_SAMPLES}x{NUM_REWARDS}", layout=layout_name, dtype="float32"),
               call, nbytes, graphable)


if __name__ == "__main__":
    args = parse_args(__doc__)
    run_benchmark(args, reference.group_advantages, cases(args),
                  ["bytes = N K E + 5 N + 8 G K (rewards in; advantages, valid, group mean/std out)",
                   "target: triton under 15 us on an H100"])
