"""One training step in several variants, side by side in one process on the same preset, shape
and device:

    naive             eager blocks, unfused PyTorch reference ops, torch's default AdamW, eager
                      rollout, the teacher's CFG as two forwards (issue 6's anchor), fp32 master
                      weights (bf16 autocast on CUDA)
    optimized         per-block torch.compile, the fused ops (Triton on CUDA), CFG as one forward of
                      twice the batch; on CUDA torch.compile's reduce-overhead mode (every compiled
                      block of the grad passes, forward and backward, replayed from CUDA graphs of its
                      own; the skips that torch reports, count and reasons, are recorded), the no-grad
                      rollout and DMD scores replayed whole, each from one CUDA graph, through a
                      default-mode compile of the blocks (fastdmd.rollout.graphs.add_twin)
                      and the generator and the critic computing on bf16 copies of their fp32 weights
                      (perf.master_weights), stepped by MasterAdamW: bf16 gradients in, one fused
                      update writing the fp32 weights, the copies and the EMA; q/k/v projections fused
                      in the teacher and the copies, forward and backward; the rollout on the
                      generator's copy. Not perf.gelu_epilogue: on an H100 it gained nothing (2026-11-27,
                      same process, twice: 0.1309 against 0.1267 s/step without, 0.1284 against 0.1280).
                      On CPU, where bf16 and CUDA graphs gain nothing:
                      fp32 weights, torch.compile's default mode, fused AdamW
    optimized-default-mode  optimized with torch.compile's default mode, the rollout and the DMD scores
                      replayed from CUDA graphs of their own (CUDA); the optimized step until H100,
                      2026-11-26, same process: 0.158 against reduce-overhead's 0.141 s/step
    optimized-autocast  optimized-default-mode as it was before master weights beat it (H100,
                      2026-11-26: 0.249 against 0.227 s/step, same process): the fp32 weights under bf16
                      autocast (CUDA), torch's fused AdamW, the rollout on a bf16 copy of the generator;
                      the path that FSDP2 runs (master weights are one process only). On CPU the same
                      as optimized

A variant's name may add settings, applied after its own: NAME+section.option=value+..., e.g.
optimized+perf.gelu_epilogue=true, to measure one option's gain in the same process.

For each: s/step (the timed steps' step numbers are chosen so that their backward-simulation steps
k, which set how many generator forwards the rollout runs, cycle through 0..K-1 as training draws
them uniformly; s/step is the mean over k of each k's median; use --steps a multiple of K, 4 for
the presets), samples/s, MFU (the naive step's
FLOPs, torch.utils.flop_counter over the same step numbers, against the matmul peak measured in the
same run: bf16 on CUDA, fp32 on CPU), peak memory (CUDA: max allocated over the warm-up and timed
steps, and max reserved, which holds the CUDA graphs' private pools; CPU: process peak RSS,
cumulative), the per-phase breakdown by the phase names of DESIGN.md (fastdmd.profiling; separate
steps, synchronized at each phase boundary, with the peak memory allocated in each phase on CUDA),
the full few-step sample at batch 1 (every generator step, no grad), called as the variant calls
its generator (compiled blocks where it compiles them) and, on CUDA, replayed from one CUDA graph,
and with --profile one profiled step (device busy time, in all and per phase against the phase's
wall time and with the calls into compiled code, top kernels, copy kernels by their launching ops,
Chrome trace) and, on CUDA, one more without the phase synchronization, as the timed steps run: its
idle time summed by the host range the GPU waited on (and its trimmed trace). Writes
benchmarks/results/step_throughput_<preset>_<device>.{json,md} after every variant; a variant that
fails is recorded with its error and the others still run.

    python benchmarks/step_throughput.py                                  # digits on this machine's device
    python benchmarks/step_throughput.py --preset sd3-medium --depth 12 --batch 4 --resolution 512 \
        --variants naive optimized optimized+perf.gelu_epilogue=true --profile
    python benchmarks/step_throughput.py --preset flux-dev --depth 2 --batch 1 --resolution 512

The sd3-medium and flux-dev presets build the real architectures with random weights (depth
overridable); flux-dev needs a GPU's memory even at depth 1 (about 22 GB of host memory on CPU:
3 blocks of 3072 channels for teacher, generator, critic and two AdamW states).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import copy
import dataclasses
import gc
import gzip
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from _bench_common import cuda_graphed, median_seconds, synchronize
from fastdmd.config import ConfigError, parse_args
from fastdmd.distributed import World
from fastdmd.profiling import PHASES, phase_times
from fastdmd.rollout import sample_with_draws
from fastdmd.rollout.graphs import twins_in_place
from fastdmd.trainer import Trainer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


VARIANTS = ("naive", "optimized", "optimized-default-mode", "optimized-autocast")


def split_variant(name: str) -> tuple[str, list[str]]:
    """A variant's name, NAME or NAME+section.option=value+...: (NAME, the options as command-line
    arguments, applied after NAME's). For A/B runs of one option in one process:
    `--variants naive optimized optimized+perf.gelu_epilogue=true`."""
    base, *settings = name.split("+")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {base!r}; expected one of {', '.join(VARIANTS)}, optionally followed "
                         f"by +section.option=value (e.g. optimized+perf.gelu_epilogue=true)")
    extra = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"variant {name!r}: {setting!r} is not section.option=value "
                             f"(e.g. optimized+perf.gelu_epilogue=true)")
        extra += [f"--{key}", value]
    return base, extra


def variant_slug(name: str) -> str:
    """The variant's name as it may appear in a file name (no '+', '=' or '.')."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _variant_type(name: str) -> str:
    try:
        split_variant(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def variant_args(name: str, cuda: bool, compile_backend: str) -> list[str]:
    """naive: eager, reference ops, torch's default AdamW (foreach on CUDA), CFG as two forwards. The
    others (see the module docstring): per-block torch.compile, fused ops, fused q/k/v projections, the
    DMD scores and the rollout replayed from CUDA graphs (CUDA); on CUDA bf16 copies of the trained
    weights (perf.master_weights) except in optimized-autocast, whose rollout runs on a bf16 copy of the
    generator; optimized on CUDA with torch.compile's reduce-overhead mode, the grad passes' compiled
    blocks replayed from CUDA graphs of their own (cudagraph trees), forward and backward, the rollout
    and the scores from whole-call graphs of the blocks' default-mode twins. NAME+section.option=value: see
    split_variant."""
    name, extra = split_variant(name)
    return _base_variant_args(name, cuda, compile_backend) + extra


def _base_variant_args(name: str, cuda: bool, compile_backend: str) -> list[str]:
    precision = ["--perf.mixed_precision", "bf16"] if cuda else []
    if name == "naive":
        return ["--ops.backend", "reference", "--perf.fused_optimizer", "false", "--perf.batched_cfg", "false",
                *precision]
    weights = [] if not cuda else ["--perf.rollout_weights", "bf16"] if name == "optimized-autocast" else \
        ["--perf.master_weights", "true"]
    mode = ["--perf.compile_mode", "reduce-overhead"] if name == "optimized" and cuda else []
    return ["--ops.backend", "auto", "--perf.compile", "true", "--perf.compile_backend", compile_backend,
            "--perf.cuda_graph_rollout", "true", "--perf.cuda_graph_scores", "true", "--perf.fuse_qkv", "true",
            *weights, *mode, *precision]


def preset_args(preset: str, batch: int) -> list[str]:
    common = ["--trainer.batch_size", str(batch), "--trainer.sample_every", "0", "--trainer.checkpoint_every", "0",
              "--eval.at_end", "false", "--trainer.warmup_steps", "0", "--trainer.critic_updates", "1"]
    if preset == "digits":
        return common
    recipe = {"sd3-medium": "sd3-dmd2", "flux-dev": "flux-dmd2"}[preset]
    return ["--recipe", recipe, "--model.path", "<in memory>", "--model.prompts", "<in memory>", *common]


def build_family(preset: str, depth: int | None, resolution: int, device: torch.device):
    """The preset's random-weight family, its teacher kept in host memory: each variant takes its own
    copy (`variant_family`). None for digits (each variant loads the shipped teacher)."""
    if preset == "digits":
        return None
    from fastdmd.models.family import random_family
    family = random_family(preset, depth, resolution, device=device)
    family.teacher.cpu()
    return family


def variant_family(family):
    """A fresh copy of the teacher for one variant: a variant changes its teacher in place (compiled
    blocks, fused q/k/v projections), which must not carry into the next variant."""
    return None if family is None else dataclasses.replace(family, teacher=copy.deepcopy(family.teacher))


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """FLOP/s of a large square matmul, best of 3 trials: bf16 on CUDA, fp32 on CPU (where bf16 is
    not the fast path)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps, best = (20 if device.type == "cuda" else 3), 0.0
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best, str(dtype).removeprefix("torch.")


def profile_step(trainer: Trainer, step: int, device: torch.device, trace_path: str | None) -> dict:
    """One step under torch.profiler: the device's busy time (the sum of its kernels' times; below
    s/step by what the GPU waits for the host), the top kernels (CPU: ops by self time), the work of
    each phase by kind, on CUDA the copy / cast kernels by the ops that launched them, and the Chrome
    trace (gzipped) when trace_path is given."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof, phase_times() as spent:  # phase walls of this same step
        trainer.train_step(step)
        synchronize(device)
    if cuda:  # the kernels (and copies) themselves: each once, not again under the op that launched it
        events = [e for e in prof.key_averages() if is_device_work(e)]
        self_time = lambda e: e.self_device_time_total  # noqa: E731
    else:
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
        self_time = lambda e: e.self_cpu_time_total  # noqa: E731
    top = sorted(events, key=self_time, reverse=True)[:25]
    all_events = prof.events()
    work = phase_work_ms(all_events, cuda)
    result = {"profile_k": trainer.backward_simulation_step(step),
              "profile_device_busy_ms": sum(self_time(e) for e in events) / 1e3 if cuda else None,
              "profile_top": [{"name": e.key[:80], "calls": e.count, "self_ms": self_time(e) / 1e3} for e in top],
              "profile_phase_busy_ms": {phase: sum(names.values()) for phase, names in work.items()},
              "profile_phase_wall_ms": {name: 1e3 * seconds for name, seconds in spent.seconds.items()},
              "profile_phase_top": top_by_phase(work),
              "profile_compiled_calls": compiled_calls_by_phase(all_events, cuda)}
    if cuda:
        result["profile_phase_kind_ms"] = kinds_by_phase(work)
        result["profile_copy_origins"] = copy_origins(all_events)
        result["profile_device_idle"] = device_idle_gaps(all_events)
    if trace_path:
        result["profile_trace"] = trace_path + ".gz"
        result["profile_trace_kernels"] = write_traces(prof, trace_path, keep_full=True)
    return result


def write_traces(prof, trace_path: str, keep_full: bool) -> str:
    """The profiler's Chrome trace, gzipped beside trace_path when keep_full, and always its trimmed copy
    (trim_trace), whose path is returned."""
    prof.export_chrome_trace(trace_path)
    if keep_full:
        with open(trace_path, "rb") as src, gzip.open(trace_path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    kernels_path = trace_path.removesuffix(".json") + "_kernels.json.gz"
    trim_trace(trace_path, kernels_path)
    os.remove(trace_path)
    return kernels_path


# What trim_trace keeps of a Chrome trace besides the host ops that ran long: the device's work, the
# host's calls that queued it, the phase ranges and the links between launch and kernel.
TRACE_KEPT_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime", "cuda_driver", "user_annotation",
                         "gpu_user_annotation", "ac2g"}


def trim_trace(path: str, out: str, min_host_op_us: float = 50.0) -> None:
    """A gzipped copy of the Chrome trace at `path` small enough to bring back from a lent GPU machine
    (the full one of an SD3 step may exceed what the device tool returns): every kernel, copy and memset,
    the CUDA runtime / driver calls and flow links, the phase ranges, the metadata, and the host ops of
    at least min_host_op_us (the short ones are most of the events and show only as gaps)."""
    with open(path) as f:
        trace = json.load(f)
    trace["traceEvents"] = [e for e in trace.get("traceEvents", [])
                            if e.get("ph") == "M" or e.get("cat") in TRACE_KEPT_CATEGORIES
                            or (e.get("cat") == "cpu_op" and e.get("dur", 0) >= min_host_op_us)]
    with gzip.open(out, "wt") as f:
        json.dump(trace, f)


# The host ranges of compiled code: dynamo's around each call of a compiled frame (forward), AOTAutograd's
# around each compiled backward.
COMPILED_FORWARD, COMPILED_BACKWARD = "Torch-Compiled Region", "CompiledFunctionBackward"


def compiled_calls_by_phase(events, cuda: bool) -> dict[str, int]:
    """How many times each phase entered torch.compile'd code, forward or backward. A phase with
    compiled blocks but no calls here ran them eagerly: dynamo skipped them (a recompile limit, a
    dispatch mode) or they were replayed from a CUDA graph, whose replay runs no host code."""
    from torch.autograd import DeviceType

    phase_of = phase_locator(events, cuda)
    calls = collections.Counter(phase_of(e) for e in events if e.device_type == DeviceType.CPU and (
        e.name.startswith(COMPILED_FORWARD) or e.name == COMPILED_BACKWARD))
    return dict(calls)


def is_device_work(event) -> bool:
    """A kernel, copy or memset the GPU ran; not a profiler range drawn on the GPU's timeline (a phase's
    record_function shows there too, and would count its kernels a second time)."""
    from torch.autograd import DeviceType

    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


# What a kernel does, from its name (cuBLAS / cuDNN / ATen / Inductor); the first kind that matches wins.
KERNEL_KINDS = (
    ("torch.compile", ("triton_",)),  # Inductor's kernels: their names list the fused ops (_to_copy, ...)
    ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn::fusion")),  # the last: cuDNN SDPA's helpers
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "conv")),
    ("optimizer, foreach", ("multi_tensor_apply", "adam")),
    ("copy / cast", ("copy", "catarray", "memcpy", "memset")),
)
OTHER_KIND = "other"
OUTSIDE = "(outside the phases)"


def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP counter knows the CUDA attention kernels (flash, efficient, cuDNN) but not the CPU one that
# SDPA runs on CPU: without these its FLOPs were missing from every CPU count (torch 2.11 and 2.13).
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flop}


def flop_by_kind(counts: dict) -> dict[str, int]:
    """A FlopCounterMode's counts by op as the two kinds of kernel that do them: attention (the SDPA
    ops, forward and backward) and matmul (every other op it counts: mm, addmm, bmm, convolutions)."""
    kinds = {"matmul": 0, "attention": 0}
    for op, flops in counts.items():
        kinds["attention" if "attention" in str(op) else "matmul"] += flops
    return kinds


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(part in lowered for part in parts)), OTHER_KIND)


def phase_work_ms(events, cuda: bool) -> dict[str, dict[str, float]]:
    """Milliseconds of work per phase of one profiled step, by name: on CUDA the kernels' (and copies')
    device time, on CPU the ops' self time. An op goes to the outermost phase range it started in. A
    kernel goes to the outermost phase opened last on the host before it started: the profiled step
    synchronizes at every phase boundary, so the kernels still queued when their phase's range closed
    have run before the next phase opens; those no op launched (replayed from CUDA graphs) are placed
    too. Set against the phase's wall time, a low share says the GPU waited for the host there (the
    profiler's own host overhead included)."""
    from torch.autograd import DeviceType

    phase_of = phase_locator(events, cuda)
    work = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in events:
        if cuda:
            if not is_device_work(e):
                continue
            ms = e.time_range.elapsed_us() / 1e3
        else:
            if e.device_type != DeviceType.CPU or not e.self_cpu_time_total:
                continue
            ms = e.self_cpu_time_total / 1e3
        work[phase_of(e)][e.name] += ms
    return {phase: dict(names) for phase, names in work.items()}


def phase_locator(events, cuda: bool):
    """event -> the phase phase_work_ms gives it (OUTSIDE when none)."""
    from torch.autograd import DeviceType

    ranges = sorted((e.time_range.start, -e.time_range.end, e.name) for e in events  # the outer first on a tie
                    if e.name in PHASES and e.device_type == DeviceType.CPU)
    outer = []
    for start, neg_end, name in ranges:
        if not outer or start >= outer[-1][1]:
            outer.append((start, -neg_end, name))
    starts = [start for start, _, _ in outer]

    def phase_of(e) -> str:
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        inside = i >= 0 and (cuda or e.time_range.start < outer[i][1])
        return outer[i][2] if inside else OUTSIDE
    return phase_of


NO_LAUNCHER = "(no launching call found)"


def copy_origins(events, n: int = 15) -> list[dict]:
    """The copy / cast kernels of a profiled CUDA step by what launched them: per phase, the launching op
    and the ops around it, innermost first (e.g. `aten::copy_ < aten::_to_copy < aten::to <
    autograd::engine::evaluate_function: ToCopyBackward0`), with their calls and device ms; the n
    heaviest. The launching op is the one the kernel's linked correlation id names or else the host
    op around the CUDA runtime call that queued it (the call and the kernel share CUPTI's correlation
    id): on torch 2.11 + CUDA 13 the kernels' linked ids were 0, which had every copy grouped under a
    profiler overhead event (`Activity Buffer Request`). Kernels replayed from a CUDA graph name the
    graph launch (`cudaGraphLaunch < ...`)."""
    from torch.autograd import DeviceType

    phase_of = phase_locator(events, cuda=True)
    host = [e for e in events if e.device_type == DeviceType.CPU and e.id]
    ops = {e.id: e for e in host if not getattr(e, "linked_correlation_id", 0)}
    runtime_calls = {}
    for e in host:  # cudaLaunchKernel, cuLaunchKernel, cudaMemcpyAsync, cudaGraphLaunch, ...
        if e.name.startswith("cu"):
            runtime_calls.setdefault(e.id, e)
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if not is_device_work(e) or kernel_kind(e.name) != "copy / cast":
            continue
        chain, linked = [], getattr(e, "linked_correlation_id", 0)
        op = ops.get(linked) if linked else None
        if op is None and (call := runtime_calls.get(e.id)) is not None:
            if "Graph" in call.name:
                chain.append(call.name)
            op = call.cpu_parent
        while op is not None and len(chain) < 4 and op.name not in PHASES:
            chain.append(op.name[:70])
            op = op.cpu_parent
        total = totals[(phase_of(e), " < ".join(chain) or NO_LAUNCHER)]
        total[0] += 1
        total[1] += e.time_range.elapsed_us() / 1e3
    rows = [{"phase": phase, "launched_by": chain, "calls": calls, "ms": round(ms, 3)}
            for (phase, chain), (calls, ms) in totals.items()]
    return sorted(rows, key=lambda row: -row["ms"])[:n]


# CUDA runtime calls after which the host has waited for the device (the trainer's reads of logged values,
# the profiled step's own synchronization at each phase boundary: cudaDeviceSynchronize).
SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent")


def device_idle_gaps(events, n: int | None = 10, min_ms: float = 1.0) -> list[dict]:
    """Where the GPU of a profiled CUDA step sat idle for min_ms or more, the n longest (all: n None): the phase of the work
    that ended the gap, its length, when it started (ms into the step), the synchronizing runtime call that
    returned as it began (the host had waited for the device to drain) and the innermost host range that
    spans most of it (what the host was doing while the GPU waited: e.g. an optimizer's step between the
    synchronization that reads the gradient norm and its kernel's launch). The profiled step synchronizes
    at every phase boundary too: a gap after `cudaDeviceSynchronize` at a phase's start is that, the
    launch latency of the next phase, which the timed steps overlap."""
    from torch.autograd import DeviceType

    work = sorted((e for e in events if is_device_work(e)), key=lambda e: e.time_range.start)
    if not work:
        return []
    phase_of = phase_locator(events, cuda=True)
    host = [e for e in events if e.device_type == DeviceType.CPU]
    syncs = [e for e in host if e.name.startswith("cu") and any(part in e.name for part in SYNC_CALLS)]
    # A range over most of a gap lasts half of min_ms at least: the others need not be searched.
    ranges = [h for h in host if not h.name.startswith("cu") and h.time_range.elapsed_us() >= 500 * min_ms]
    step_start = min(e.time_range.start for e in host) if host else work[0].time_range.start
    gaps, busy_until = [], work[0].time_range.end
    for e in work[1:]:
        start, end = busy_until, e.time_range.start
        if end - start >= min_ms * 1e3:
            gaps.append((start, end, e))
        busy_until = max(busy_until, e.time_range.end)
    rows = []
    for start, end, after in sorted(gaps, key=lambda gap: gap[0] - gap[1])[:n]:
        length = end - start
        returned = [c for c in syncs if start - 100 <= c.time_range.end <= start + min(500, length / 2)]
        spanning = [h for h in ranges if min(h.time_range.end, end) - max(h.time_range.start, start) >= 0.5 * length]
        inner = min(spanning, key=lambda h: h.time_range.elapsed_us(), default=None)
        rows.append({"phase": phase_of(after), "idle_ms": round(length / 1e3, 3),
                     "at_ms": round((start - step_start) / 1e3, 2),
                     "after_sync": returned[-1].name if returned else "",
                     "host_meanwhile": inner.name[:80] if inner is not None else ""})
    return rows


def idle_summary(events, min_ms: float = 0.05, n: int = 12) -> dict:
    """The device's time in one profiled CUDA step: busy (its work's own time), span (first work's start to
    last work's end), the idle time in gaps shorter than min_ms (mostly the launch latency between a CUDA
    graph's kernels) and in longer ones, and those longer gaps summed by (phase, whether a synchronizing
    call returned as the gap began, innermost host range over most of it): the n largest sums."""
    work = sorted((e for e in events if is_device_work(e)), key=lambda e: e.time_range.start)
    if not work:
        return {}
    busy = sum(e.time_range.elapsed_us() for e in work)
    short, busy_until = 0.0, work[0].time_range.end
    for e in work[1:]:
        if 0 < e.time_range.start - busy_until < min_ms * 1e3:
            short += e.time_range.start - busy_until
        busy_until = max(busy_until, e.time_range.end)
    sums: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0])
    for gap in device_idle_gaps(events, n=None, min_ms=min_ms):
        key = (gap["phase"], gap["after_sync"], gap["host_meanwhile"])
        sums[key][0] += 1
        sums[key][1] += gap["idle_ms"]
    rows = [{"phase": phase, "after_sync": after, "host_meanwhile": meanwhile, "gaps": count, "idle_ms": round(ms, 3)}
            for (phase, after, meanwhile), (count, ms) in sums.items()]
    return {"busy_ms": busy / 1e3, "span_ms": (busy_until - work[0].time_range.start) / 1e3,
            "idle_short_ms": short / 1e3, "idle_ms": sum(row["idle_ms"] for row in rows), "min_gap_ms": min_ms,
            "by_host": sorted(rows, key=lambda row: -row["idle_ms"])[:n]}


def profile_free_step(trainer: Trainer, step: int, device: torch.device, trace_path: str | None) -> dict:
    """One more profiled step (CUDA), run as the timed steps run: without the synchronization at every phase
    boundary that profile_step's phase walls need, so its idle gaps are the timed step's own (the profiler's
    host overhead aside). idle_summary of it, and its trimmed trace when trace_path is given. A kernel's phase
    here is the one the host had open when the kernel started: for the work after a gap, where the GPU
    waited for the host, that is the phase whose host work it waited on."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step(step)
        synchronize(device)
    result = {"free_profile": idle_summary(prof.events()) | {"k": trainer.backward_simulation_step(step)}}
    if trace_path:
        result["free_profile_trace_kernels"] = write_traces(prof, trace_path, keep_full=False)
    return result


def kinds_by_phase(work: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """phase_work_ms's kernels summed by kernel_kind."""
    kinds = collections.defaultdict(lambda: collections.defaultdict(float))
    for phase, names in work.items():
        for name, ms in names.items():
            kinds[phase][kernel_kind(name)] += ms
    return {phase: dict(by_kind) for phase, by_kind in kinds.items()}


def top_by_phase(work: dict[str, dict[str, float]], n: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Each phase's n heaviest kernels (or ops): (name, ms)."""
    return {phase: sorted(((name[:100], ms) for name, ms in names.items()), key=lambda item: -item[1])[:n]
            for phase, names in work.items()}


def measure(name: str, args: list[str], family, device, warmup: int, steps: int,
            profile_trace: str | None = None, profile: bool = False) -> dict:
    """s/step from `steps` steps run back to back with no synchronization inside them (the step's
    own syncs only), then the phase breakdown from as many more steps with phase timing on (which
    synchronizes at every phase boundary, so its phases add up to more than s/step), and peak memory
    over all of them. Then the extras, each of which records its error instead of failing the
    variant: the batch-1 sample, the profiled step, the FLOPs of the timed steps. Also the variant's own
    wall time, all of it (compilation included), to plan runs on machines lent for a fixed time."""
    start = time.perf_counter()
    with compile_events() as events:
        row = _measure(name, args, family, device, warmup, steps, profile_trace, profile)
    return row | events | {"measure_seconds": time.perf_counter() - start}


def cycling_k_steps(trainer: Trainer, after: int, count: int) -> list[int]:
    """`count` step numbers after `after`, increasing, whose backward-simulation steps k go 0, 1, ..., K-1,
    0, 1, ...: with count a multiple of K, every k equally often, as in training."""
    ks = len(trainer.cfg.dmd.generator_sigmas)
    numbers, n = [], after
    for i in range(count):
        n += 1
        while trainer.backward_simulation_step(n) != i % ks:
            n += 1
        numbers.append(n)
    return numbers


def medians_by_k(timed: list[dict]) -> dict[int, tuple[float, int]]:
    """{k: (median seconds, count)} of the timed steps ({"k", "seconds"} each), by increasing k."""
    return {k: (statistics.median(t["seconds"] for t in timed if t["k"] == k), sum(t["k"] == k for t in timed))
            for k in sorted({t["k"] for t in timed})}


def mean_over_k(timed: list[dict]) -> float:
    """The mean over the k present of the median time of the timed steps at that k."""
    return statistics.fmean(median for median, _ in medians_by_k(timed).values())


def _measure(name, args, family, device, warmup, steps, profile_trace, profile) -> dict:
    cfg = parse_args(args)
    if device.type == "cuda":  # reserved memory too starts from what this variant holds (nothing cached)
        gc.collect()
        torch.cuda.empty_cache()
    trainer = Trainer(cfg, World(device=device), family=family)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Warm-up: compiles, captures the CUDA graphs, fills the optimizer state. On CUDA a step's graphs
    # depend on its backward-simulation step k, so there it runs until every k has come twice (the
    # cudagraph trees of reduce-overhead record a path on its second run); `warmup` steps at least.
    step, seen = 0, collections.Counter()
    every_k = range(len(cfg.dmd.generator_sigmas)) if device.type == "cuda" else ()
    while step < warmup or any(seen[k] < 2 for k in every_k):
        step += 1
        seen[trainer.backward_simulation_step(step)] += 1
        trainer.train_step(step)
    # A step's work depends on its backward-simulation step k (k generator forwards in the rollout), drawn
    # uniformly in training: the timed steps are step numbers whose k cycle through 0..K-1, and s/step is
    # the mean over k of each k's median time (a plain median of a few steps reads the k that happened to
    # come up most: session 14's five timed steps had k = 0, 2, 2, 3, 0).
    timed_steps = cycling_k_steps(trainer, after=step, count=steps)
    times = []
    for step in timed_steps:
        synchronize(device)
        start = time.perf_counter()
        trainer.train_step(step)
        synchronize(device)
        times.append(time.perf_counter() - start)
    by_k = [{"step": n, "k": trainer.backward_simulation_step(n), "seconds": t} for n, t in zip(timed_steps, times)]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # CUDA graphs keep their memory in private pools, which count as reserved, not allocated, between replays.
    peak_reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
    phases, phase_peaks = dict.fromkeys(PHASES, 0.0), {}
    phase_steps = cycling_k_steps(trainer, after=step, count=steps)
    for step in phase_steps:  # phase timing resets CUDA's peak statistics: after the step's peak was read
        with phase_times() as spent:
            trainer.train_step(step)
        for key, value in spent.seconds.items():
            phases[key] += value / steps
        for key, value in spent.peak_bytes.items():
            phase_peaks[key] = max(phase_peaks.get(key, 0), value)
    per_step = mean_over_k(by_k)
    row = {"variant": name, "args": args, "s_per_step": per_step, "samples_per_s": cfg.trainer.batch_size / per_step,
           "timed_steps": by_k,
           "peak_memory_bytes": peak, "peak_reserved_bytes": peak_reserved, "phase_s": phases, "phase_peak_memory_bytes": phase_peaks,
           "optimizer": trainer.optimizer_name,
           "rollout": trainer.rollout.reason or "CUDA graph", "scores": trainer.scores_graphs,
           "fused_qkv": trainer.fused_qkv, "ops_backend": cfg.ops.backend}

    def count_flops() -> dict:
        # The timed steps again: a step's work depends on its backward-simulation step k, drawn from
        # the step number, so the same numbers give the same mix as the timing. Each step's count by
        # kind too, by its k: the profiled step's work rate (work_rate_table) reads it.
        total, by_k = 0, {}
        for timed in timed_steps:
            with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
                trainer.train_step(timed)
            total += counter.get_total_flops()
            by_k[str(trainer.backward_simulation_step(timed))] = flop_by_kind(counter.get_flop_counts()["Global"])
        return {"flop_per_step_counted": total / steps, "flop_by_kind_at_k": by_k}

    # The FLOP count last: FlopCounterMode is a dispatch mode, under which dynamo skips every frame it
    # meets and marks its code to be skipped from then on, so after it the compiled blocks run eagerly
    # (a profiled step after it profiled an eager step: the GPU sessions of 2026-11-26 before this order).
    extras = [("sample_batch1", lambda: sample_batch1_ms(trainer, device))]
    if profile:
        extras.append(("profile", lambda: profile_step(trainer, step + 1, device, profile_trace)))
        if device.type == "cuda":
            free_trace = profile_trace.removesuffix("_trace.json") + "_free_trace.json" if profile_trace else None
            extras.append(("free_profile", lambda: profile_free_step(trainer, step + 2, device, free_trace)))
    extras.append(("flop_count", count_flops))
    for extra, run in extras:
        try:
            row |= run()
        except Exception as e:  # noqa: BLE001 - the timing stands; say what could not be measured
            traceback.print_exc()
            row[f"{extra}_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return row


@contextlib.contextmanager
def compile_events():
    """What torch.compile did while inside: the graphs dynamo compiled and the graph breaks it made
    (code between two graphs runs eagerly), the recompile limits it hit (from there on a block runs
    eagerly, with only a log line to say so), and what the cudagraph trees (reduce-overhead) declined
    to replay from CUDA graphs (the skips and their distinct reasons; a skipped block runs its compiled
    kernels without a graph). A variant's speed is read with these."""
    from torch._dynamo.convert_frame import log as dynamo_log
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_utils import cudagraphs_log

    def collector(keep):
        messages: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage().splitlines()[0][:300]
                if keep(message) and message not in messages:
                    messages.append(message)

        return Collect(), messages

    skips, skip_reasons = collector(lambda message: True)
    limits, limit_messages = collector(lambda message: "recompile_limit" in message or "cache_size_limit" in message)
    before = (counters["inductor"]["cudagraph_skips"], counters["stats"]["unique_graphs"],
              sum(counters["graph_break"].values()))
    found: dict = {}
    cudagraphs_log.addHandler(skips)
    dynamo_log.addHandler(limits)
    try:
        yield found
    finally:
        cudagraphs_log.removeHandler(skips)
        dynamo_log.removeHandler(limits)
        found |= {"cudagraph_skips": counters["inductor"]["cudagraph_skips"] - before[0],
                  "cudagraph_skip_reasons": skip_reasons[:10],
                  "compiled_graphs": counters["stats"]["unique_graphs"] - before[1],
                  "graph_breaks": sum(counters["graph_break"].values()) - before[2],
                  "recompile_limit_hits": limit_messages[:10]}


def sample_batch1_ms(trainer: Trainer, device: torch.device) -> dict:
    """Milliseconds of the full few-step sample (len(generator_sigmas) generator calls, no grad) at
    batch 1 with the rollout's generator and the trainer's precision: called directly, through the variant's
    compiled blocks where it compiles them (torch.compile builds their batch-1 graphs in the warm-up calls), and
    on CUDA replayed from one CUDA graph (the error instead of a time where capture fails): with compiled blocks,
    the rollout as the optimized step runs it."""
    sigmas = trainer.cfg.dmd.generator_sigmas
    noise = torch.randn((1, *trainer.family.sample_shape), device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    draws = [torch.randn_like(noise) for _ in sigmas[:-1]]

    generator = trainer.rollout.x0_fn  # the rollout's generator: a bf16 copy with perf.rollout_weights bf16

    @torch.no_grad()
    def sample():
        if trainer.cfg.perf.blocks_in_cuda_graphs:  # no output of an earlier call is read again
            torch.compiler.cudagraph_mark_step_begin()
        with trainer._autocast():
            return sample_with_draws(generator, noise, labels, sigmas, draws)

    result = {"sample_steps": len(sigmas), "sample_batch1_ms": 1e3 * median_seconds(sample, device, 20)}
    if device.type == "cuda":
        try:
            with twins_in_place():  # reduce-overhead's blocks cannot record their own graphs in this capture
                graphed = cuda_graphed(sample)
            result["sample_batch1_graph_ms"] = 1e3 * median_seconds(graphed, device, 20)
        except Exception as e:  # noqa: BLE001 - a failed capture is a result: record why
            result["sample_batch1_graph_ms"] = None
            result["sample_batch1_graph_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", choices=("digits", "sd3-medium", "flux-dev"))
    p.add_argument("--depth", type=_positive_int, default=None, help="transformer blocks (sd3-medium: 24; flux-dev: 19 "
                   "double-stream, with twice as many single-stream)")
    p.add_argument("--batch", type=_positive_int, default=None, help="samples per step (digits 64, sd3-medium 2)")
    p.add_argument("--resolution", type=_positive_int, default=1024, help="sd3-medium: image resolution in pixels")
    p.add_argument("--warmup", type=_positive_int, default=3, help="warm-up steps at least (on CUDA, until every "
                   "backward-simulation step k has come twice)")
    p.add_argument("--steps", type=_positive_int, default=8, help="timed steps (and as many phase-timed ones); their "
                   "backward-simulation steps k cycle through 0..K-1: a multiple of K (4 for the presets) weighs "
                   "every k alike")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=["naive", "optimized"], type=_variant_type,
                   help=f"the step variants to measure, in this order (naive first: the others' speed-up and MFU use "
                        f"it): {', '.join(VARIANTS)}, each optionally followed by +section.option=value settings")
    p.add_argument("--out", default=None, help="path stem of the .json and .md results")
    p.add_argument("--profile", action="store_true", help="profile one more step of each variant: device busy "
                   "time (in all and per phase), top ops, Chrome trace <out>_<variant>_trace.json.gz")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    batch = args.batch or (64 if args.preset == "digits" else 2)
    for name in args.variants:  # every variant's settings checked before the first one runs
        try:
            parse_args(preset_args(args.preset, batch) + variant_args(name, device.type == "cuda", args.compile_backend))
        except ConfigError as e:
            p.error(f"--variants {name}: {e}")
    family = build_family(args.preset, args.depth, args.resolution, device)
    peak, peak_dtype = matmul_peak(device)
    out = args.out or os.path.join(RESULTS, f"step_throughput_{args.preset}_{device.type}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "preset": args.preset, "depth": args.depth, "batch": batch, "resolution": args.resolution,
        "device_type": device.type, "matmul_peak_flops": peak, "matmul_peak_dtype": peak_dtype, "variants": [],
    }
    for name in args.variants:
        run_args = preset_args(args.preset, batch) + variant_args(name, device.type == "cuda", args.compile_backend) \
            + ["--run_dir", os.path.join("runs", "step_throughput", variant_slug(name))]
        try:
            row = measure(name, run_args, variant_family(family), device, args.warmup, args.steps, profile=args.profile,
                          profile_trace=f"{out}_{variant_slug(name)}_trace.json" if args.profile else None)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result too; the others still run
            traceback.print_exc()
            row = {"variant": name, "args": run_args, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            print(f"{name}: FAILED ({row['error']})", flush=True)
        record["variants"].append(row)
        add_ratios(record)
        if "error" not in row:
            print(f"{name}: {row['s_per_step']:.4f} s/step, {row['samples_per_s']:.1f} samples/s, "
                  f"measured in {row['measure_seconds']:.0f} s, "
                  f"MFU {_percent(row['mfu'])}, peak {row['peak_memory_bytes'] / 2**30:.2f} GiB, "
                  f"batch-1 sample: {_ms(row.get('sample_batch1_ms'))} called, "
                  f"{_ms(row.get('sample_batch1_graph_ms'))} CUDA graph", flush=True)
        with open(out + ".json", "w") as f:  # after every variant: a run cut short keeps what it measured
            json.dump(record, f, indent=2)
        with open(out + ".md", "w") as f:
            f.write(report(record))
        release_variant()
    print(report(record))
    failed = [v["variant"] for v in record["variants"] if "error" in v]
    if failed:
        raise SystemExit(f"step_throughput: {len(failed)} variant(s) failed: {', '.join(failed)} (their rows say why)")


def add_ratios(record: dict) -> None:
    """MFU of every variant from one FLOP count, the naive eager step's (its work is the model's; a
    count taken through compiled code or graph replays need not be), and the speed-up over naive.
    Without a naive variant: each variant's own count on CPU, and no MFU on CUDA, where the work that
    CUDA graphs replay is missing from a variant's count (SD3-medium d12: 25.7 of 44.6 TFLOP counted)."""
    done = [v for v in record["variants"] if "error" not in v]
    naive = next((v for v in done if v["variant"] == "naive"), None)
    flops = naive.get("flop_per_step_counted") if naive else None
    own_count = naive is None and record.get("device_type", "cpu") != "cuda"
    by_k = naive.get("flop_by_kind_at_k") if naive else None
    for v in done:
        v["model_flop_per_step"] = flops or (v.get("flop_per_step_counted") if own_count else None)
        v["model_flop_by_kind_at_k"] = by_k or (v.get("flop_by_kind_at_k") if own_count else None)
        v["mfu"] = v["model_flop_per_step"] / v["s_per_step"] / record["matmul_peak_flops"] \
            if v["model_flop_per_step"] else None
        v["speedup_vs_naive"] = naive["s_per_step"] / v["s_per_step"] if naive else None


def release_variant() -> None:
    """Free the last variant's compiled code and memory before the next one is built."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001
        return "not installed"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _mb(x: int | None) -> str:
    return f"{x / 2**20:.0f}" if x is not None else "n/a"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} ms"


def work_rate_table(v: dict, peak: float) -> list[str]:
    """The profiled step's matmul and attention kernels (device time summed over its phases) against the
    FLOPs of that kind at the step's k (the naive step's count, as MFU's), and what is left of the device
    time: work with no counted FLOP (torch.compile's pointwise and norm kernels, the optimizer, copies).
    Says which kind holds an MFU short of its target. CUDA only (a CPU profile has no kernels by kind)."""
    kinds_by_phase = v.get("profile_phase_kind_ms")
    flops = (v.get("model_flop_by_kind_at_k") or {}).get(str(v.get("profile_k")))
    if not kinds_by_phase or not flops or v.get("profile_device_busy_ms") is None:
        return []
    lines = ["", f"Profiled step, {v['variant']} (k = {v['profile_k']}): the work rate of its matmul and attention "
             "kernels, the FLOPs of each kind being the naive step's count at this k (attention: the SDPA ops; "
             "matmul: the other counted ops), against the matmul peak; the rest of the device time does no "
             "counted FLOP", "", "| kind | device ms | TFLOP | TFLOP/s | of the peak |", "|---|---:|---:|---:|---:|"]
    counted_ms = 0.0
    for kind in ("matmul", "attention"):
        ms = sum(phase.get(kind, 0.0) for phase in kinds_by_phase.values())
        counted_ms += ms
        rate = flops[kind] / (ms / 1e3) if ms else None
        lines.append(f"| {kind} | {ms:.2f} | {flops[kind] / 1e12:.2f} | "
                     + (f"{rate / 1e12:.1f} | {rate / peak:.0%} |" if rate else "- | - |"))
    lines.append(f"| the rest | {v['profile_device_busy_ms'] - counted_ms:.2f} | - | - | - |")
    return lines


def idle_table(variant: str, gaps: list[dict]) -> list[str]:
    """The report's lines for device_idle_gaps' rows (none without rows)."""
    if not gaps:
        return []
    lines = ["", f"Profiled step, {variant}: where the GPU sat idle 1 ms or more (the longest; `after`: the "
             "synchronizing call that returned as the gap began, cudaDeviceSynchronize being the profiled step's "
             "own at phase boundaries; `host meanwhile`: the innermost host range over most of the gap)", "",
             "| phase | idle (ms) | at (ms) | after | host meanwhile |", "|---|---:|---:|---|---|"]
    return lines + [f"| {g['phase']} | {g['idle_ms']:.2f} | {g['at_ms']:.2f} | {g['after_sync'] or '-'} | "
                    f"{'`' + g['host_meanwhile'] + '`' if g['host_meanwhile'] else '-'} |" for g in gaps]


def timed_by_k(v: dict) -> str:
    """'k=0: 0.1201 s (2), k=1: ...': the variant's timed steps' median s/step (and count) at each k."""
    return ", ".join(f"k={k}: {median:.4f} s ({count})" for k, (median, count) in medians_by_k(v["timed_steps"]).items())


def timed_at_k(v: dict, k: int) -> str:
    """'; the timed steps at k: 131.2 ms' (empty when no timed step had that k)."""
    same = medians_by_k(v.get("timed_steps") or []).get(k)
    return f"; the timed steps at this k: {1e3 * same[0]:.1f} ms" if same else ""


def free_idle_table(variant: str, summary: dict) -> list[str]:
    """The report's lines for profile_free_step's idle_summary (none without one)."""
    if not summary:
        return []
    k = f" (k = {summary['k']})" if "k" in summary else ""
    lines = ["", f"Profiled step without phase synchronization, {variant}{k}, as the timed steps run: device busy "
             f"{summary['busy_ms']:.1f} ms over a span of {summary['span_ms']:.1f} ms; idle "
             f"{summary['idle_ms']:.1f} ms in gaps of {1e3 * summary['min_gap_ms']:.0f} us or more, "
             f"{summary['idle_short_ms']:.1f} ms in shorter ones (mostly between a CUDA graph's kernels). The longer "
             "gaps summed by the phase of the work that ended them, the synchronizing call that returned as they "
             "began and the innermost host range over most of them:", "",
             "| phase | after | host meanwhile | gaps | idle (ms) |", "|---|---|---|---:|---:|"]
    return lines + [f"| {row['phase']} | {row['after_sync'] or '-'} | "
                    f"{'`' + row['host_meanwhile'] + '`' if row['host_meanwhile'] else '-'} | {row['gaps']} | "
                    f"{row['idle_ms']:.2f} |" for row in summary["by_host"]]


def report(r: dict) -> str:
    done = [v for v in r["variants"] if "error" not in v]
    lines = [f"# Step throughput, preset {r['preset']}", "",
             f"{r['date']}, {r['device']}, torch {r['torch']}, triton {r['triton']}, diffusers {r['diffusers']}; "
             f"command: `{r['command']}`", "",
             f"batch {r['batch']}, depth {r['depth']}, matmul peak {r['matmul_peak_flops'] / 1e12:.3f} TFLOP/s "
             f"({r['matmul_peak_dtype']}); every variant in the same process on the same inputs. MFU: the naive "
             "eager step's FLOP count over each variant's s/step and the peak (without a naive variant: each "
             "variant's own count on CPU, none on CUDA, where CUDA-graph replays hide work from a count). The "
             "batch-1 sample: the few-step sample with the rollout's generator, called as the variant calls it (compiled blocks where it compiles) and "
             "replayed from one CUDA graph.", "",
             "| variant | s/step | speed-up vs naive | samples/s | MFU | GFLOP/step counted | peak memory (MB) | peak reserved (MB) "
             "| optimizer | rollout | DMD scores | fused q/k/v | batch-1 sample, called (ms) | batch-1 sample, CUDA graph (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---:|"]
    for v in r["variants"]:
        if "error" in v:
            lines.append(f"| {v['variant']} | failed: {v['error']} |" + " |" * 12)
            continue
        graph_ms = v.get("sample_batch1_graph_ms")
        graph = f"{graph_ms:.2f}" if graph_ms is not None else v.get("sample_batch1_graph_error", "n/a (CPU)")
        called = v.get("sample_batch1_ms")
        called = f"{called:.2f}" if called is not None else v.get("sample_batch1_error", "n/a")
        speedup = f"{v['speedup_vs_naive']:.2f}x" if v.get("speedup_vs_naive") else "n/a"
        counted = v.get("flop_per_step_counted")
        counted = f"{counted / 1e9:.1f}" if counted is not None else v.get("flop_count_error", "n/a")
        lines.append(f"| {v['variant']} | {v['s_per_step']:.4f} | {speedup} | {v['samples_per_s']:.1f} "
                     f"| {_percent(v['mfu'])} | {counted} | {v['peak_memory_bytes'] / 2**20:.0f} | {_mb(v.get('peak_reserved_bytes'))} "
                     f"| {v['optimizer']} | {v['rollout']} | {v.get('scores', 'n/a')} | {v.get('fused_qkv', 'n/a')} "
                     f"| {called} | {graph} |")
    lines += ["", "Timed steps by backward-simulation step k (the rollout runs k generator forwards; s/step above is "
              "the mean over k of these medians): " + "; ".join(f"{v['variant']} {timed_by_k(v)}" for v in done if v.get("timed_steps"))]
    lines += ["", "Phases (s/step), from separate steps timed with a synchronization at every phase boundary:", "",
              "| phase | " + " | ".join(v["variant"] for v in done) + " |",
              "|---|" + "---:|" * len(done)]
    for name in PHASES:
        lines.append(f"| {name} | " + " | ".join(f"{v['phase_s'][name]:.4f}" for v in done) + " |")
    peaks = [v for v in done if v.get("phase_peak_memory_bytes")]
    if peaks:
        lines += ["", "Peak memory allocated during each phase (GiB; CUDA, the same phase-timed steps):", "",
                  "| phase | " + " | ".join(v["variant"] for v in peaks) + " |", "|---|" + "---:|" * len(peaks)]
        for name in PHASES:
            lines.append(f"| {name} | " + " | ".join(
                f"{v['phase_peak_memory_bytes'][name] / 2**30:.2f}" if name in v["phase_peak_memory_bytes"] else "-"
                for v in peaks) + " |")
    for v in done:
        if v.get("compiled_graphs") or v.get("graph_breaks") or v.get("recompile_limit_hits"):
            lines += ["", f"{v['variant']}: torch.compile compiled {v['compiled_graphs']} graph(s) with "
                      f"{v['graph_breaks']} graph break(s)" + (": recompile limit hit: " + "; ".join(
                          f"`{m}`" for m in v["recompile_limit_hits"]) if v.get("recompile_limit_hits") else "")]
        if v.get("cudagraph_skips"):
            lines += ["", f"{v['variant']}: torch.compile's cudagraph trees skipped {v['cudagraph_skips']} time(s): "
                      + "; ".join(f"`{reason}`" for reason in v["cudagraph_skip_reasons"])]
        if "profile_error" in v:
            lines += ["", f"Profiled step, {v['variant']}: failed ({v['profile_error']})"]
        if "profile_top" not in v:
            continue
        busy = v["profile_device_busy_ms"]
        k = v.get("profile_k")
        lines += ["", f"Profiled step, {v['variant']}" + (f" (k = {k}{timed_at_k(v, k)})" if k is not None else "") + ": "
                  + (f"device busy {busy:.1f} ms" if busy is not None else "CPU self times")
                  + (f"; trace {os.path.basename(v['profile_trace'])}" if v.get("profile_trace") else ""), "",
                  ("| kernel | calls | ms |" if busy is not None else "| op | calls | self ms |"), "|---|---:|---:|"]
        lines += [f"| `{t['name']}` | {t['calls']} | {t['self_ms']:.2f} |" for t in v["profile_top"]]
        busy_by_phase = v.get("profile_phase_busy_ms") or {}
        if busy_by_phase:
            what = "device busy" if busy is not None else "CPU self time"
            kinds_by_phase = v.get("profile_phase_kind_ms") or {}
            kinds = [kind for kind in [*(k for k, _ in KERNEL_KINDS), OTHER_KIND]
                     if any(kind in phase_kinds for phase_kinds in kinds_by_phase.values())]
            lines += ["", f"Profiled step, {v['variant']}, by phase: {what} (ms) against the phase's wall time in "
                      "the same step (synchronized at the phase boundaries, profiler overhead included); a low share "
                      "is a phase where the GPU waits for the host; compiled calls: the phase's calls into "
                      "torch.compile'd code (none where compiled blocks ran eagerly, or from a CUDA graph)"
                      + ("; then the device time by kind of kernel" if kinds else ""), "",
                      "| phase | busy (ms) | wall (ms) | busy / wall | compiled calls |"
                      + "".join(f" {kind} |" for kind in kinds),
                      "|---|---:|---:|---:|---:|" + "---:|" * len(kinds)]
            walls = v.get("profile_phase_wall_ms", {})
            compiled = v.get("profile_compiled_calls") or {}
            for name in [*PHASES, OUTSIDE]:
                if name not in busy_by_phase:
                    continue
                wall = walls.get(name, 0.0)
                share = f"{busy_by_phase[name] / wall:.0%}" if wall else "-"
                lines.append(f"| {name} | {busy_by_phase[name]:.2f} | {wall:.2f} | {share} | {compiled.get(name, 0)} |"
                             + "".join(f" {kinds_by_phase.get(name, {}).get(kind, 0.0):.2f} |" for kind in kinds))
            tops = v.get("profile_phase_top") or {}
            if tops:
                lines += ["", f"Profiled step, {v['variant']}: the heaviest {'kernels' if kinds else 'ops'} of "
                          "each phase (ms)", ""]
                lines += [f"- {name}: " + "; ".join(f"`{kernel}` {ms:.2f}" for kernel, ms in tops[name])
                          for name in [*PHASES, OUTSIDE] if tops.get(name)]
        lines += work_rate_table(v, r["matmul_peak_flops"])
        origins = v.get("profile_copy_origins") or []
        if origins:
            lines += ["", f"Profiled step, {v['variant']}: the copy / cast kernels by the ops that launched them "
                      "(innermost first)", "", "| phase | launched by | calls | ms |", "|---|---|---:|---:|"]
            lines += [f"| {o['phase']} | `{o['launched_by']}` | {o['calls']} | {o['ms']:.2f} |" for o in origins]
        lines += idle_table(v["variant"], v.get("profile_device_idle") or [])
        lines += free_idle_table(v["variant"], v.get("free_profile") or {})
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
