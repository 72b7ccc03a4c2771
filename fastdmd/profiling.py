"""Phase markers for traces and the benchmark's per-phase table.

`phase(name)` opens an NVTX range (torch.cuda.nvtx when CUDA is present; a no-op otherwise) named
after the step phases of DESIGN.md, and a torch.profiler record_function so CPU traces show the
same names. Inside `phase_times()` it also adds its wall time to a table (outermost phases only, so
the parts add up to the step; CUDA is synchronized at each boundary), which is what
benchmarks/step_throughput.py reports.
"""

from __future__ import annotations

import contextlib
import time

import torch

PHASES = ("rollout", "generator_fwd", "real_score", "fake_score", "dmd_op", "reward", "generator_bwd",
          "optimizer", "critic_update")


def _nvtx_range(name: str):
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


_times: dict[str, float] | None = None
_depth = 0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def phase_times():
    """Collect {phase: seconds} of the outermost phases run inside the block."""
    global _times
    _times = dict.fromkeys(PHASES, 0.0)
    try:
        yield _times
    finally:
        _times = None


@contextlib.contextmanager
def phase(name: str):
    global _depth
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
    timed = _times is not None and _depth == 0
    if timed:
        _sync()
        start = time.perf_counter()
    _depth += 1
    try:
        with _nvtx_range(name), torch.profiler.record_function(name):
            yield
    finally:
        _depth -= 1
        if timed and _times is not None:
            _sync()
            _times[name] += time.perf_counter() - start
