"""benchmarks/step_throughput.py on the digits preset: both variants measured, the phases account for
the step, FLOPs counted, the record says where and how it was made."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_preset_side_by_side(tmp_path):
    out = tmp_path / "st"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_throughput.py"), "--batch", "8",
                           "--warmup", "1", "--steps", "2", "--compile-backend", "eager", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "st.json").read_text())
    naive, optimized = record["variants"]
    assert (naive["variant"], optimized["variant"]) == ("naive", "optimized")
    assert naive["optimizer"] == "torch AdamW (default)" and optimized["optimizer"] == "torch AdamW (fused; beta1 0: no exp_avg kept)"
    assert "--perf.compile" in optimized["args"] and "--perf.compile" not in naive["args"]
    for v in (naive, optimized):
        assert v["flop_per_step_counted"] > 1e9 and v["s_per_step"] > 0 and v["peak_memory_bytes"] > 0
        assert v["measure_seconds"] > (1 + 2 + 2) * v["s_per_step"]  # warm-up, timed and phase-timed steps at least
        phases = sum(v["phase_s"].values())
        # separate steps with a sync at every phase boundary: they cover the step, a little more on a busy CPU
        assert 0.6 * v["s_per_step"] < phases <= 1.5 * v["s_per_step"]
        assert v["phase_s"]["critic_update"] > 0 and v["phase_s"]["rollout"] > 0
        # one FLOP count, the naive eager step's, for every variant's MFU
        assert v["model_flop_per_step"] == naive["flop_per_step_counted"]
        assert v["mfu"] == v["model_flop_per_step"] / v["s_per_step"] / record["matmul_peak_flops"]
        assert v["sample_steps"] == 4 and v["sample_batch1_ms"] > 0
    assert optimized["speedup_vs_naive"] == naive["s_per_step"] / optimized["s_per_step"]
    # the FLOPs by kind of each timed step (k = 0, then 1: one generator forward more), the naive step's for all
    by_k = naive["flop_by_kind_at_k"]
    assert set(by_k) == {"0", "1"} and by_k["1"]["matmul"] > by_k["0"]["matmul"] > 0
    assert by_k["1"]["attention"] > by_k["0"]["attention"] > 0  # the CPU attention kernel's FLOPs counted too
    assert sum(sum(kinds.values()) for kinds in by_k.values()) / 2 == naive["flop_per_step_counted"]
    assert optimized["model_flop_by_kind_at_k"] == by_k
    assert record["device"].startswith("cpu") and record["torch"] and "step_throughput.py" in record["command"]
    assert "| phase | naive | optimized |" in (tmp_path / "st.md").read_text()


def _run_main(tmp_path, *argv, script=""):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import step_throughput as st; " + script +
              "sys.argv = ['step_throughput.py'] + sys.argv[2:]; st.main()")
    return subprocess.run([sys.executable, "-c", script, os.path.join(ROOT, "benchmarks"), *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_failing_variant_is_recorded_and_the_others_still_run(tmp_path):
    """A variant that fails while it runs (here: a CUDA error, injected) keeps its error beside the naive
    variant's figures, and the exit status says that one failed."""
    fail = ("measure = st.measure; st.measure = lambda name, *a, **k: measure(name, *a, **k) if name == 'naive' "
            "else (_ for _ in ()).throw(RuntimeError('CUDA error: an illegal memory access was encountered')); ")
    done = _run_main(tmp_path, "--batch", "8", "--warmup", "1", "--steps", "1", "--variants", "naive", "optimized",
                     "--out", str(tmp_path / "st"), script=fail)
    assert done.returncode == 1 and "1 variant(s) failed: optimized" in done.stderr, done.stderr[-2000:]
    naive, optimized = json.loads((tmp_path / "st.json").read_text())["variants"]
    assert naive["s_per_step"] > 0 and "error" not in naive
    assert optimized["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "| optimized | failed:" in (tmp_path / "st.md").read_text()


def test_a_variant_the_config_refuses_stops_the_run_before_any_is_measured(tmp_path):
    done = _run_main(tmp_path, "--variants", "naive", "optimized+perf.gelu_epilogu=true", "--out", str(tmp_path / "st"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: --variants optimized+perf.gelu_epilogu=true: unknown config key 'perf.gelu_epilogu'" in done.stderr
    assert not (tmp_path / "st.json").exists()


def test_an_extra_that_fails_leaves_the_timing(tmp_path, monkeypatch):
    """The FLOP count, the batch-1 sample and the profile are extras: one that fails records its error
    and the variant keeps its s/step."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    monkeypatch.setattr(step_throughput, "sample_batch1_ms", lambda *args: 1 / 0)
    args = step_throughput.preset_args("digits", 4) + step_throughput.variant_args("naive", False, "aot_eager") \
        + ["--run_dir", str(tmp_path), "--threads", "1"]
    row = step_throughput.measure("naive", args, None, torch.device("cpu"), warmup=1, steps=1)
    assert row["s_per_step"] > 0 and row["flop_per_step_counted"] > 0
    assert row["sample_batch1_error"].startswith("ZeroDivisionError")
    assert "sample_batch1_ms" not in row


def test_cudagraph_tree_skips_and_recompile_limits_are_recorded_with_their_reasons(monkeypatch):
    """torch.compile's reduce-overhead mode reports a block it will not replay from a CUDA graph
    through a logger and a counter, dynamo a code object past its recompile limit (which then runs
    eagerly) through a log line: the benchmark records them per variant, with the graphs compiled."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    def scaled(x, k):
        return x * k

    compiled = torch.compile(scaled, backend="eager", dynamic=False)
    torch._dynamo.reset()
    # not monkeypatch: since pytest 9.2 it deletes an attribute that is not in the module's __dict__ on
    # undo, and torch's config module then hides recompile_limit from every later test
    with torch._dynamo.config.patch(recompile_limit=2), step_throughput.compile_events() as found:
        for _ in range(2):
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)")
        for k in range(4):  # an int argument is specialized: each new value recompiles
            assert compiled(torch.ones(2), k).tolist() == [k, k]
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to something after")
    assert found["cudagraph_skips"] == 2
    assert found["cudagraph_skip_reasons"] == ["skipping cudagraphs due to mutated inputs (2 instances)"]
    assert found["compiled_graphs"] == 2 and found["graph_breaks"] == 0
    assert len(found["recompile_limit_hits"]) == 1 and "recompile_limit" in found["recompile_limit_hits"][0]


def test_phase_table_keeps_each_phases_peak_memory(monkeypatch):
    """On CUDA every outermost phase starts from a reset peak and keeps the highest peak of its runs;
    nested phases belong to the outer one. (CUDA's allocator statistics are stood in for here.)"""
    from fastdmd import profiling

    allocated = {"now": 0, "peak": 0}

    def allocate(nbytes):
        allocated["now"] += nbytes
        allocated["peak"] = max(allocated["peak"], allocated["now"])

    monkeypatch.setattr(profiling, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    with profiling.phase_times() as table:
        for transient in (300, 500):
            with profiling.phase("rollout"):
                allocate(transient)
                allocate(-transient)
        with profiling.phase("critic_update"):
            allocate(100)
            with profiling.phase("optimizer"):
                allocate(1000)
    assert table.peak_bytes == {"rollout": 500, "critic_update": 1100}
    assert set(table.seconds) == set(profiling.PHASES) and table.seconds["rollout"] > 0


def test_each_variant_takes_an_unchanged_teacher(tmp_path, monkeypatch):
    """A variant changes its teacher in place (compiled blocks, fused q/k/v): the next variant, naive
    included, must start from the preset's own weights and layers."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    cpu = torch.device("cpu")
    family = step_throughput.build_family("sd3-medium", 1, 64, cpu)
    before = {k: v.clone() for k, v in family.teacher.state_dict().items()}
    args = step_throughput.preset_args("sd3-medium", 1) + step_throughput.variant_args("optimized", False, "aot_eager") \
        + ["--run_dir", str(tmp_path), "--threads", "1", "--model.resolution", "64"]
    row = step_throughput.measure("optimized", args, step_throughput.variant_family(family), cpu, warmup=1, steps=1)
    assert row["fused_qkv"] == "teacher"
    naive_teacher = step_throughput.variant_family(family).teacher
    assert naive_teacher.state_dict().keys() == before.keys()  # not fused
    assert all(torch.equal(v, before[k]) for k, v in naive_teacher.state_dict().items())
    assert not any(getattr(block, "_compiled_call_impl", None) for block in naive_teacher.transformer_blocks)


def test_gpu_kernels_go_to_the_phase_that_queued_them_graph_replays_included(monkeypatch):
    """On CUDA a kernel can start after its phase's host range closed (it was queued) or have no
    launching op (a graph replay): it counts for the phase opened last before it started. The
    phases' own ranges on the GPU timeline are not kernels, and each kernel is sorted by kind."""
    import types

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return types.SimpleNamespace(name=name, time_range=Interval(start, end), device_type=device,
                                     is_user_annotation=annotation, self_cpu_time_total=0)

    events = [
        event("rollout", 0, 10, DeviceType.CPU), event("generator_fwd", 12, 20, DeviceType.CPU),
        event("generator_fwd", 12, 30, annotation=True),  # the range drawn on the GPU timeline
        event("Memcpy HtoD (Pageable -> Device)", -5, -4),  # before any phase
        event("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_bias_TNT", 2, 5000),  # launched in the rollout
        event("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda", 11, 2011),
        event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1", 13, 3013),
        event("triton_poi_fused__to_copy_add_mul_0", 25, 1025),  # after generator_fwd's range: still its own
        event("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(a", 26, 526),
        event("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float", 27, 277),
    ]
    work = step_throughput.phase_work_ms(events, cuda=True)
    assert step_throughput.kinds_by_phase(work) == {
        step_throughput.OUTSIDE: {"copy / cast": 0.001},
        "rollout": {"matmul": 4.998, "copy / cast": 2.0},
        "generator_fwd": {"attention": 3.0, "torch.compile": 1.0, "optimizer, foreach": 0.5, "other": 0.25},
    }
    assert [step_throughput.is_device_work(e) for e in events[2:4]] == [False, True]
    top = step_throughput.top_by_phase(work, n=2)["generator_fwd"]
    assert [(name[:21], ms) for name, ms in top] == [("cudnn_generated_fort_", 3.0), ("triton_poi_fused__to_", 1.0)]


def test_copy_kernels_are_traced_to_the_ops_that_launched_them(monkeypatch):
    """Each copy / cast kernel of a profiled CUDA step is grouped by its phase and the chain of host ops
    around its launching op, innermost first and stopping at the phase. The launching op: the one the
    kernel's linked correlation id names, or else the op around the CUDA runtime call with the kernel's
    own correlation id (torch 2.11 + CUDA 13 gave kernels linked id 0, and a profiler overhead event id
    0 too: it must not take them); a graph replay names its cudaGraphLaunch. Other kernels are left out."""
    import types

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    def op(name, start, end, id=0, parent=None, linked=0):
        return types.SimpleNamespace(name=name, time_range=Interval(start, end), device_type=DeviceType.CPU, id=id,
                                     cpu_parent=parent, is_user_annotation=False, linked_correlation_id=linked)

    def kernel(name, start, end, launched_by=0, correlation=0):
        return types.SimpleNamespace(name=name, time_range=Interval(start, end), device_type=DeviceType.CUDA,
                                     id=correlation, cpu_parent=None, is_user_annotation=False,
                                     linked_correlation_id=launched_by)

    bwd = op("generator_bwd", 0, 100, id=1)
    accumulate = op("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 1, 50, id=2, parent=bwd)
    clone = op("aten::clone", 2, 40, id=3, parent=accumulate)
    copy = op("aten::copy_", 3, 30, id=4, parent=clone)
    opt = op("optimizer", 100, 200, id=5)
    refill = op("aten::copy_", 101, 150, id=6, parent=op("aten::_foreach_copy_", 101, 160, id=7, parent=opt))
    # CUDA runtime calls: their own (CUPTI) correlation ids, linked to their ops' ids
    launch = op("cudaLaunchKernel", 104, 105, id=9001, parent=refill, linked=6)
    replay = op("cudaGraphLaunch", 170, 171, id=9002, parent=op("CUDAGraph::replay", 169, 172, id=8, parent=opt),
                linked=8)
    overhead = op("Activity Buffer Request", 0, 300)  # id 0, linked 0
    copy_kernel = "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda"
    cast_kernel = "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kern"
    events = [bwd, accumulate, clone, copy, opt, refill, refill.cpu_parent, launch, replay, replay.cpu_parent, overhead,
              kernel(copy_kernel, 10, 1010, launched_by=4), kernel(copy_kernel, 20, 2020, launched_by=4),
              kernel(cast_kernel, 110, 610, correlation=9001),  # no linked id: found through cudaLaunchKernel
              kernel(cast_kernel, 175, 275, correlation=9002), kernel(cast_kernel, 180, 230, correlation=9002),
              kernel(cast_kernel, 190, 200),  # no linked id, no runtime call
              kernel("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_bias_TNT", 12, 5012, launched_by=4)]
    assert step_throughput.copy_origins(events) == [
        {"phase": "generator_bwd", "launched_by": "aten::copy_ < aten::clone < autograd::engine::evaluate_function: "
         "torch::autograd::AccumulateGrad", "calls": 2, "ms": 3.0},
        {"phase": "optimizer", "launched_by": "aten::copy_ < aten::_foreach_copy_", "calls": 1, "ms": 0.5},
        {"phase": "optimizer", "launched_by": "cudaGraphLaunch < CUDAGraph::replay", "calls": 2, "ms": 0.15},
        {"phase": "optimizer", "launched_by": step_throughput.NO_LAUNCHER, "calls": 1, "ms": 0.01}]


def test_the_profiled_step_splits_its_work_by_phase(tmp_path, monkeypatch):
    """--profile gives each phase the work of the ops that started inside it (on CPU their self time,
    on CUDA their kernels' device time), beside that phase's wall time in the same step."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput
    from fastdmd.profiling import PHASES

    args = step_throughput.preset_args("digits", 4) + step_throughput.variant_args("naive", False, "aot_eager") \
        + ["--run_dir", str(tmp_path), "--threads", "1"]
    row = step_throughput.measure("naive", args, None, torch.device("cpu"), warmup=1, steps=1, profile=True)
    busy, wall = row["profile_phase_busy_ms"], row["profile_phase_wall_ms"]
    for name in ("rollout", "generator_fwd", "real_score", "fake_score", "generator_bwd", "optimizer", "critic_update"):
        assert busy[name] <= 1.05 * wall[name], (name, busy[name], wall[name])
        if wall[name] > 2.0:  # (the rollout may be nothing at all: k = 0) beyond overheads, a CPU is never idle
            assert busy[name] > 0.7 * wall[name], (name, busy[name], wall[name])
    assert set(busy) <= {*PHASES, step_throughput.OUTSIDE} and busy.get(step_throughput.OUTSIDE, 0) < 0.05 * sum(busy.values())
    record = {"preset": "digits", "date": "d", "device": "cpu", "torch": "t", "triton": "t", "diffusers": "d",
              "command": "c", "batch": 4, "depth": None, "matmul_peak_flops": 1.0, "matmul_peak_dtype": "float32",
              "variants": [row]}
    step_throughput.add_ratios(record)
    assert "| phase | busy (ms) | wall (ms) | busy / wall |" in step_throughput.report(record)


def test_the_optimized_variant_trains_bf16_copies_and_its_profiled_step_runs_compiled(tmp_path, monkeypatch):
    """optimized on CUDA: perf.master_weights (the rollout on the generator's own bf16 copy rather than a
    second one) under reduce-overhead; optimized-autocast keeps the fp32 weights under autocast with a
    rollout copy. optimized-default-mode run here with the CUDA arguments (bf16 on CPU too, which master
    weights need; reduce-overhead would need CUDA) and --profile: the profiled step
    must enter compiled code in each phase that has compiled blocks. It did not when the FLOP count (a
    dispatch mode, after which dynamo skips the blocks' code for good) ran before it."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    args = step_throughput.variant_args("optimized", True, "aot_eager")
    assert args[args.index("--perf.master_weights") + 1] == "true" and "--perf.rollout_weights" not in args
    assert args[args.index("--perf.compile_mode") + 1] == "reduce-overhead"
    assert "--perf.compile_mode" not in step_throughput.variant_args("optimized", False, "aot_eager")
    args = step_throughput.variant_args("optimized-default-mode", True, "aot_eager")  # runs on CPU
    assert args[args.index("--perf.master_weights") + 1] == "true" and "--perf.compile_mode" not in args
    assert args[args.index("--perf.mixed_precision") + 1] == "bf16"
    autocast = step_throughput.variant_args("optimized-autocast", True, "aot_eager")
    assert "--perf.master_weights" not in autocast and autocast[autocast.index("--perf.rollout_weights") + 1] == "bf16"
    assert "--perf.master_weights" not in step_throughput.variant_args("optimized", False, "aot_eager")
    assert "--perf.gelu_epilogue" not in step_throughput.variant_args("optimized", True, "aot_eager")  # no gain
    run_args = step_throughput.preset_args("digits", 4) + args + ["--run_dir", str(tmp_path), "--threads", "1"]
    row = step_throughput.measure("optimized-default-mode", run_args, None, torch.device("cpu"), warmup=1, steps=1,
                                  profile=True)
    assert row["s_per_step"] > 0 and row["compiled_graphs"] > 0 and row["flop_per_step_counted"] > 0
    assert "MasterAdamW" in row["optimizer"]
    compiled = row["profile_compiled_calls"]
    for phase in ("generator_fwd", "real_score", "fake_score", "generator_bwd", "critic_update"):
        assert compiled.get(phase, 0) > 0, (phase, compiled)


def test_the_trimmed_trace_keeps_the_device_work_the_launches_and_the_long_host_ops(tmp_path, monkeypatch):
    """The trace brought back from a lent GPU: kernels, copies, runtime calls, their flow links, the phase
    ranges and metadata are all kept; of the host ops only those of at least min_host_op_us."""
    import gzip

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    events = [{"ph": "M", "name": "process_name", "args": {"name": "python"}},
              {"ph": "X", "cat": "user_annotation", "name": "generator_fwd", "ts": 0, "dur": 900},
              {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 1, "dur": 80},
              {"ph": "X", "cat": "cpu_op", "name": "aten::view", "ts": 2, "dur": 3},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 3, "dur": 5},
              {"ph": "s", "cat": "ac2g", "id": 7, "ts": 3}, {"ph": "f", "cat": "ac2g", "id": 7, "ts": 10},
              {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst", "ts": 10, "dur": 40},
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 60, "dur": 2},
              {"ph": "X", "cat": "python_function", "name": "torch/nn/modules/module.py", "ts": 0, "dur": 500}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events, "deviceProperties": [{"name": "H100"}]}))
    step_throughput.trim_trace(str(path), str(tmp_path / "k.json.gz"), min_host_op_us=50)
    with gzip.open(tmp_path / "k.json.gz", "rt") as f:
        trimmed = json.load(f)
    assert trimmed["deviceProperties"] == [{"name": "H100"}]
    assert [e.get("name", e["ph"]) for e in trimmed["traceEvents"]] == [
        "process_name", "generator_fwd", "aten::linear", "cudaLaunchKernel", "s", "f", "nvjet_sm90_tst", "Memcpy DtoD"]


def test_device_idle_gaps_name_the_synchronization_and_the_host_work_the_gpu_waited_on(monkeypatch):
    """A profiled step where the optimizer phase reads the gradient norm (the host waits for the device),
    then spends 1.05 ms in the optimizer's step before its kernel: that gap is found, with its phase, the
    synchronizing call that returned as it began and the innermost host range over it. Gaps shorter than
    1 ms are left out; none is found in a step without gaps."""
    import types

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    def host(name, start, end):
        return types.SimpleNamespace(name=name, time_range=Interval(start, end), device_type=DeviceType.CPU,
                                     is_user_annotation=False)

    def kernel(name, start, end):
        return types.SimpleNamespace(name=name, time_range=Interval(start, end), device_type=DeviceType.CUDA,
                                     is_user_annotation=False)

    events = [host("generator_bwd", 0, 1000), kernel("mm", 10, 900),
              host("optimizer", 1000, 3000), host("cudaStreamSynchronize", 1010, 1905), kernel("norm", 1000, 1900),
              host("Optimizer.step#MasterAdamW.step", 1910, 2900), host("aten::stack", 1920, 1990),
              kernel("_master_adamw_kernel", 2950, 3500),
              host("critic_update", 3000, 5000), host("cudaDeviceSynchronize", 3400, 3510),
              kernel("mm", 3800, 4800)]  # 0.3 ms after the phase boundary: under 1 ms
    gaps = step_throughput.device_idle_gaps(events)
    assert gaps == [{"phase": "optimizer", "idle_ms": 1.05, "at_ms": 1.9, "after_sync": "cudaStreamSynchronize",
                     "host_meanwhile": "Optimizer.step#MasterAdamW.step"}]
    assert step_throughput.device_idle_gaps(events, min_ms=0.2)[1]["after_sync"] == "cudaDeviceSynchronize"
    assert step_throughput.device_idle_gaps([kernel("mm", 0, 10), kernel("mm", 10, 20)]) == []
    report = "\n".join(step_throughput.idle_table("optimized", gaps))
    assert "| optimizer | 1.05 | 1.90 | cudaStreamSynchronize | `Optimizer.step#MasterAdamW.step` |" in report

    # Without phase synchronization: the same step's idle time summed by where the host was (by hand: gaps
    # 900-1000, 1900-2950, 3500-3800, 5000-5210 and 5300-5420 us; 4800-4803 and 4900-4902 under 50 us).
    summary = step_throughput.idle_summary(events + [kernel("mm", 4803, 4900), kernel("mm", 4902, 5000),
                                                     host("aten::stack", 5000, 5200), kernel("mm", 5210, 5300),
                                                     host("aten::stack", 5300, 5400), kernel("mm", 5420, 5500)],
                                           min_ms=0.05)
    assert summary["busy_ms"] == pytest.approx((890 + 900 + 550 + 1000 + 97 + 98 + 90 + 80) / 1e3)
    assert summary["span_ms"] == pytest.approx(5.49)
    assert summary["idle_short_ms"] == pytest.approx(0.005)
    assert summary["by_host"][0] == {"phase": "optimizer", "after_sync": "cudaStreamSynchronize",
                                     "host_meanwhile": "Optimizer.step#MasterAdamW.step", "gaps": 1, "idle_ms": 1.05}
    assert summary["by_host"][1] == {"phase": "critic_update", "after_sync": "", "host_meanwhile": "aten::stack",
                                     "gaps": 2, "idle_ms": 0.33}
    assert [row["idle_ms"] for row in summary["by_host"]] == [1.05, 0.33, 0.3, 0.1]
    assert summary["idle_ms"] == pytest.approx(1.78)
    table = "\n".join(step_throughput.free_idle_table("optimized", summary))
    assert "device busy 3.7 ms over a span of 5.5 ms; idle 1.8 ms in gaps of 50 us or more" in table
    assert "| critic_update | - | `aten::stack` | 2 | 0.33 |" in table
    assert step_throughput.free_idle_table("optimized", {}) == []


def test_timed_steps_weigh_every_backward_simulation_step_alike(monkeypatch):
    """A step's work depends on its backward-simulation step k (k generator forwards in the rollout), which
    training draws uniformly: the timed step numbers cycle through k = 0..K-1, and s/step is the mean over
    k of each k's median (a plain median of steps with k = 0, 2, 2, 3, 0 reads a k = 2 step)."""
    import types

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    draws = {n: (n * 7 + n // 3) % 4 for n in range(1, 200)}  # a fixed, irregular k per step number
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(dmd=types.SimpleNamespace(generator_sigmas=(1, 2, 3, 4))),
                                    backward_simulation_step=draws.__getitem__)
    numbers = step_throughput.cycling_k_steps(trainer, after=10, count=8)
    assert [draws[n] for n in numbers] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert numbers == sorted(numbers) and numbers[0] > 10 and len(set(numbers)) == 8
    timed = [{"k": k, "seconds": s} for k, s in [(0, 1.0), (2, 3.0), (2, 3.2), (3, 4.0), (0, 1.2), (0, 9.0)]]
    assert step_throughput.mean_over_k(timed) == pytest.approx((1.2 + 3.1 + 4.0) / 3)


def test_a_variant_may_set_options_for_an_ab_run_in_one_process(monkeypatch):
    """NAME+section.option=value: NAME's arguments, then the settings, which win; the file-name form has
    none of '+', '=', '.'; a bad base or setting is refused naming it and what would be valid."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    from fastdmd.config import parse_args

    name = "optimized-default-mode+perf.gelu_epilogue=false+perf.fuse_qkv=false"
    args = step_throughput.variant_args(name, True, "aot_eager")
    assert args[:-4] == step_throughput.variant_args("optimized-default-mode", True, "aot_eager")
    assert args[-4:] == ["--perf.gelu_epilogue", "false", "--perf.fuse_qkv", "false"]
    cfg = parse_args(step_throughput.preset_args("digits", 4) + args)
    assert not cfg.perf.gelu_epilogue and not cfg.perf.fuse_qkv and cfg.perf.master_weights
    assert step_throughput.variant_slug(name) == "optimized-default-mode-perf-gelu_epilogue-false-perf-fuse_qkv-false"
    with pytest.raises(ValueError, match=r"unknown variant 'fast'; expected one of naive, optimized"):
        step_throughput.variant_args("fast+perf.fuse_qkv=false", True, "aot_eager")
    with pytest.raises(ValueError, match=r"'perf.fuse_qkv' is not section.option=value"):
        step_throughput.variant_args("optimized+perf.fuse_qkv", True, "aot_eager")


def test_without_naive_a_variants_own_flop_count_gives_its_mfu_on_cpu_only(monkeypatch):
    """On CUDA a variant's own count misses what its CUDA graphs replay (H100, SD3-medium d12: 25.7 of the
    44.6 TFLOP that the naive step counts): without the naive variant there is no MFU to give there."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    def ratios(device_type, *names):
        record = {"device_type": device_type, "matmul_peak_flops": 1e12,
                  "variants": [{"variant": n, "s_per_step": 0.5, "flop_per_step_counted": 2e11 if n == "naive" else 1e11}
                               for n in names]}
        step_throughput.add_ratios(record)
        return [(v["model_flop_per_step"], v["mfu"]) for v in record["variants"]]

    assert ratios("cuda", "naive", "optimized") == ratios("cpu", "naive", "optimized") == [(2e11, 0.4)] * 2
    assert ratios("cpu", "optimized") == [(1e11, 0.2)]
    assert ratios("cuda", "optimized") == [(None, None)]


def test_the_profiled_steps_work_rate_by_kind_of_kernel(monkeypatch):
    """Its matmul and attention kernels' device time against the naive step's FLOPs of each kind at the
    profiled step's k; the rest of the busy time does no counted FLOP."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    assert step_throughput.flop_by_kind({torch.ops.aten.mm: 5, torch.ops.aten.convolution: 2,
                                         torch.ops.aten._scaled_dot_product_cudnn_attention: 3,
                                         torch.ops.aten._scaled_dot_product_flash_attention_backward: 4}) == \
        {"matmul": 7, "attention": 7}
    v = {"variant": "optimized", "profile_k": 3, "profile_device_busy_ms": 100.0,
         "profile_phase_kind_ms": {"rollout": {"matmul": 20.0, "attention": 5.0, "torch.compile": 9.0},
                                   "critic_update": {"matmul": 40.0, "attention": 15.0, "optimizer, foreach": 8.0}},
         "model_flop_by_kind_at_k": {"0": {"matmul": 1.0, "attention": 1.0}, "3": {"matmul": 48e12, "attention": 8e12}}}
    lines = step_throughput.work_rate_table(v, peak=1e15)
    assert lines[-3:] == ["| matmul | 60.00 | 48.00 | 800.0 | 80% |", "| attention | 20.00 | 8.00 | 400.0 | 40% |",
                          "| the rest | 20.00 | - | - | - |"]
    assert step_throughput.work_rate_table(v | {"profile_k": 1}, peak=1e15) == []  # no count at that k


def test_the_flop_count_knows_the_cpu_attention_kernel(monkeypatch):
    """SDPA on CPU runs an op that torch's FLOP counter has no formula for: its FLOPs, forward and backward,
    as those of the CUDA kernels."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=step_throughput.CPU_ATTENTION_FLOPS) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 2 * (2 * 3 * 5 * 5 * 8) * 2  # Q K^T and P V: 2 FLOPs per multiply-add
    assert step_throughput.flop_by_kind(counter.get_flop_counts()["Global"]) == {"matmul": 0, "attention": 3.5 * forward}


def test_cudnn_attentions_helper_kernels_count_as_attention(monkeypatch):
    """cuDNN's SDPA backward runs helpers beside its flash kernel; `convert_dq_to_16bits` once counted as a
    matmul (its name has "conv"), and `compute_dot_do_o` as other (H100, 2026-11-27: 1.1 ms a step)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import step_throughput

    kinds = {name: step_throughput.kernel_kind(name) for name in (
        "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, void*)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0",
        "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NTN", "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc",
        "triton_poi_fused__scaled_dot_product_cudnn_attention_cat_split_transpose_view_5")}
    assert list(kinds.values()) == ["attention", "attention", "attention", "matmul", "matmul", "torch.compile"]
