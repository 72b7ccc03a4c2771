"""Phase markers for traces and the benchmark's per-phase table.

`phase(name)` opens an NVTX range (torch.cuda.nvtx when CUDA is present; a no-op otherwise) named
after the step phases of DESIGN.md, and a torch.profiler record_function so CPU traces show the
same names. Inside `phase_times()` it also adds its wall time to a table (outermost phases only, so
the parts add up to the step; CUDA is synchronized at each boundary) and, on CUDA, the peak memory
allocated while it ran (the allocator's peak is reset at each boundary), which is what
benchmarks/step_throughput.py reports.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import NamedTuple

import torch

PHASES = ("rollout", "generator_fwd", "real_score", "fake_score", "dmd_op", "reward", "generator_bwd",
          "optimizer", "critic_update")


def _nvtx_range(name: str):
    """The `nvtx` package's range when installed (extra `profile`), else torch's; nothing without CUDA."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    try:
        import nvtx
    except ImportError:
        return torch.cuda.nvtx.range(name)
    return nvtx.annotate(name)


class PhaseTable(NamedTuple):
    seconds: dict[str, float]     # wall time per phase, summed over its runs
    peak_bytes: dict[str, int]    # CUDA: the most memory allocated during any run of the phase (else empty)


_table: PhaseTable | None = None
_depth = 0


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@contextlib.contextmanager
def phase_times():
    """Collect the wall time and (CUDA) the peak allocated memory of the outermost phases run inside
    the block. Resets CUDA's peak-memory statistics at every phase boundary."""
    global _table
    _table = PhaseTable(dict.fromkeys(PHASES, 0.0), {})
    try:
        yield _table
    finally:
        _table = None


@contextlib.contextmanager
def phase(name: str):
    global _depth
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
    timed = _table is not None and _depth == 0
    if timed:
        if _cuda():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
    _depth += 1
    try:
        with _nvtx_range(name), torch.profiler.record_function(name):
            yield
    finally:
        _depth -= 1
        if timed and _table is not None:
            if _cuda():
                torch.cuda.synchronize()
                _table.peak_bytes[name] = max(_table.peak_bytes.get(name, 0), torch.cuda.max_memory_allocated())
            _table.seconds[name] += time.perf_counter() - start


class StepProfiler:
    """`--profile.trace` / `--profile.memory`: a torch.profiler Chrome trace and a CUDA memory snapshot
    of the steps [start, start + steps), written to run_dir/profile/ on rank 0 (each rank writes its
    own trace file, named by rank)."""

    def __init__(self, cfg, run_dir: str, rank: int, device: torch.device, done_steps: int = 0):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.out = os.path.join(run_dir, "profile")
        self.memory = cfg.memory and device.type == "cuda"
        self.notes = []
        if cfg.memory and not self.memory:
            self.notes.append("profile.memory needs CUDA: no memory snapshot on " + device.type)
        if (cfg.trace or self.memory) and done_steps >= cfg.start:
            self.notes.append(f"profile: this run resumes after step {done_steps}, past profile.start = {cfg.start}: "
                              f"nothing is profiled (set profile.start above {done_steps})")
        self.profiler = None
        self.written: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.cfg.trace or self.memory

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.cfg.start:
            return
        os.makedirs(self.out, exist_ok=True)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if self.cfg.trace:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                                   with_stack=False)
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        if not self.enabled or step != self.cfg.start + self.cfg.steps - 1:
            return
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            path = os.path.join(self.out, f"trace_rank{self.rank}_steps{self.cfg.start}-{step}.json")
            self.profiler.export_chrome_trace(path)
            self.written.append(path)
            self.profiler = None
        if self.memory:
            path = os.path.join(self.out, f"memory_rank{self.rank}_steps{self.cfg.start}-{step}.pickle")
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(path)
