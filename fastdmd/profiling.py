"""Phase markers for traces and the benchmark's per-phase table.

`phase(name)` opens an NVTX range (via the `nvtx` package or torch.cuda.nvtx when CUDA is present;
a no-op otherwise) named after the step phases of DESIGN.md, and a torch.profiler record_function
so CPU traces show the same names.
"""

from __future__ import annotations

import contextlib

import torch

PHASES = ("rollout", "generator_fwd", "real_score", "fake_score", "dmd_op", "reward", "generator_bwd",
          "optimizer", "critic_update")


def _nvtx_range(name: str):
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


@contextlib.contextmanager
def phase(name: str):
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
    with _nvtx_range(name), torch.profiler.record_function(name):
        yield
