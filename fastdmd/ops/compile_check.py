"""Compile every Triton kernel of fastdmd.ops for a GPU, on a machine that has none.

Without a GPU the kernels run in the Triton interpreter, which accepts code that the compiler
rejects (a type that changes across loop iterations, a constexpr that is not one, an op with no
lowering) and never shows what the compiler makes of the rest. This check runs each op's real launch
code on small CPU tensors, over the variants the ops can launch (dtypes, optional inputs, block
layouts of small and large samples, forward and backward), with Triton's driver replaced by one that
only names a target: every launch is compiled by Triton's real compiler and ptxas for that target
(sm_90, the H100, by default) and not run. Nothing needs CUDA or a GPU; the outputs are not computed.

    python -m fastdmd.ops.compile_check [--arch 90] [--json OUT.json]

It prints one line per compiled kernel: its name, dtype/flags, registers and local memory per thread
(spills; from `cuobjdump -res-usage` of the cubin, where Triton ships cuobjdump), and shared memory. Exit status 1
when a kernel fails to compile. TRITON_INTERPRET must be unset (it selects the interpreter when
triton is imported).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch


@dataclasses.dataclass
class CompiledVariant:
    kernel: str
    variant: str
    seconds: float
    shared_bytes: int | None = None
    registers: int | None = None
    local_bytes: int | None = None  # per thread: register spills (and local arrays) go here
    error: str | None = None


class _TargetOnlyDriver:
    """What JITFunction.run asks of Triton's active driver, for a target with no device behind it."""

    def __init__(self, target):
        self.target = target

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        return torch.device("cpu")


INTERPRETER_SELECTED = ("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; run "
                        "`env -u TRITON_INTERPRET python -m fastdmd.ops.compile_check`")


def interpreter_selected() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def nvidia_tool(name: str) -> str | None:
    """Path of a CUDA tool (ptxas, cuobjdump) as Triton ships it, else on PATH; None if neither."""
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


@contextlib.contextmanager
def compile_only(arch: int, compiled: list):
    """Within: every Triton launch compiles its kernel for CUDA `arch` and appends it to `compiled`."""
    if interpreter_selected():
        raise RuntimeError(INTERPRETER_SELECTED)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    real_run = JITFunction.run

    def run_as_warmup(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = run_as_warmup
    try:
        yield
    finally:
        JITFunction.run = real_run
        # Not reset_active(): that builds the default driver, which fails where there is no GPU.
        driver.set_active(None)


def _resource_usage(cubin: bytes) -> dict:
    """Registers and local memory of the kernel in `cubin`, by the cuobjdump Triton ships (if any)."""
    tool = nvidia_tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key, field in (("registers", "REG"), ("local_bytes", "LOCAL")):
        match = re.search(rf"\b{field}:(\d+)", out)
        if match:
            usage[key] = int(match.group(1))
    return usage


def _variants():
    """(name, thunk) for each op launch to compile; thunks call the ops' own launch code."""
    from fastdmd.ops import clipped_policy_loss_triton as cpl
    from fastdmd.ops import dmd_target_triton as dmd
    from fastdmd.ops import group_advantages_triton as ga
    from fastdmd.ops import master_adamw_triton as adamw

    def dmd_forward(dtype, shape, uncond, noise, weights, save_residual, one_pass=False):
        x = [torch.randn(shape).to(dtype) for _ in range(6)]
        batch = shape[0]
        coef = torch.rand(batch)

        return lambda: dmd._launch_dmd_target(
            x[0], x[1], x[2], x[3] if uncond else None, x[4], coef, coef, 3.0, coef if weights else None,
            x[5] if noise else None, coef if noise else None, 1e-8, save_residual, one_pass=one_pass)

    def dmd_backward(dtype, shape, weights):
        residual = torch.randn(shape)
        coef = torch.rand(shape[0])
        return lambda: dmd._dmd_target_backward_op(residual, torch.ones(()), coef if weights else None,
                                                   dtype)

    def policy(dtype, shape, backward_flags):
        x_prev, mean = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        per_sample = [torch.rand(shape[0]).to(dtype) + 0.5 for _ in range(3)]
        std, old_log_prob, advantages = per_sample

        def launch():
            outputs = cpl._launch_clipped_policy_loss(x_prev, mean, std, old_log_prob, advantages, 0.2)
            if backward_flags is not None:
                grads = [torch.ones(shape[0]) if flag else None for flag in backward_flags]
                ratio, mean_sq_dev, d_loss_d_log_prob = outputs[2], outputs[4], outputs[5]
                cpl._clipped_policy_loss_backward_op(x_prev, mean, std, ratio, mean_sq_dev,
                                                     d_loss_d_log_prob, *grads)
        return launch

    def group(dtype, num_samples, num_rewards, group_size, by_ids, weights, clip):
        rewards = torch.randn(num_samples, num_rewards).to(dtype)
        ids = torch.arange(num_samples) % (num_samples // group_size) if by_ids else None
        w = torch.rand(num_rewards) if weights else None
        return lambda: ga._launch_group_advantages(rewards, None if by_ids else group_size, ids, w,
                                                   1e-6, 5.0 if clip else None)

    def master_adamw(grad_dtype, copy_dtype, ema, scale, beta1, skip=False, exp_avgs=True):
        shapes = [(3, 5), (4097,)]
        masters = [torch.randn(s) for s in shapes]
        plan = adamw.MasterAdamWPlan(masters, [torch.zeros(s) for s in shapes] if exp_avgs else None,
                                     [torch.zeros(s) for s in shapes],
                                     None if copy_dtype is None else [m.to(copy_dtype) for m in masters],
                                     [m.clone() for m in masters] if ema else None)
        return lambda: adamw._launch_master_adamw(
            plan, [torch.randn(s).to(grad_dtype) for s in shapes], 1e-3, beta1, 0.999, 1e-8, 0.01, 1,
            torch.ones(()) if scale else None, 0.01 if ema else 0.0, torch.zeros((), dtype=torch.int32) if skip else None)

    # Small samples give one-block chunks; an image latent (16x128x128) the largest layout.
    shapes = {"tiny": (1, 3), "latent": (2, 16, 128, 128)}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for shape_name, shape in shapes.items():
            for flags in ((False, False, False, False), (True, True, True, True), (True, False, False, True)):
                label = "uncond={} noise={} weights={} residual={}".format(*flags)
                yield ("dmd_target", f"{name} {shape_name} {label}", dmd_forward(dtype, shape, *flags))
                yield ("dmd_target", f"{name} {shape_name} {label} one_pass",
                       dmd_forward(dtype, shape, *flags, one_pass=True))
            for weights in (False, True):
                yield ("dmd_target_backward", f"{name} {shape_name} weights={weights}",
                       dmd_backward(dtype, shape, weights))
            for backward_flags in (None, (True, False, False), (True, True, True)):
                yield ("clipped_policy_loss", f"{name} {shape_name} backward={backward_flags}",
                       policy(dtype, shape, backward_flags))
        for by_ids, weights, clip in ((False, False, False), (False, True, True), (True, True, True)):
            yield ("group_advantages", f"{name} N=1024 K=4 ids={by_ids} weights={weights} clip={clip}",
                   group(dtype, 1024, 4, 16, by_ids, weights, clip))
        # beta1 0 (DMD2's: exp_avg not read; not kept by MasterAdamW, or written for torch AdamW's state) and 0.9;
        # the trainer's (bf16 copy, EMA, clipping coefficient, skip flag, no exp_avg) first
        for copy_dtype, ema, scale, beta1, skip, exp_avgs in ((torch.bfloat16, True, True, 0.0, True, False),
                                                              (torch.bfloat16, False, True, 0.0, True, True),
                                                              (torch.bfloat16, False, False, 0.9, False, True),
                                                              (torch.float16, False, True, 0.9, False, True),
                                                              (None, False, False, 0.0, False, False)):
            copy_name = "none" if copy_dtype is None else str(copy_dtype).removeprefix("torch.")
            yield ("master_adamw", f"grads {name} copy={copy_name} ema={ema} scale={scale} beta1={beta1} skip={skip} "
                                   f"exp_avgs={exp_avgs}",
                   master_adamw(dtype, copy_dtype, ema, scale, beta1, skip, exp_avgs))


def check(arch: int = 90) -> list[CompiledVariant]:
    """Compile every variant for sm_`arch`; one CompiledVariant per kernel compiled (or failed)."""
    results = []
    for op, variant, launch in _variants():
        compiled = []
        start = time.perf_counter()
        try:
            with compile_only(arch, compiled):
                launch()
        except Exception as e:  # report every failing variant, not just the first
            message = f"{type(e).__name__}: {e}".strip().splitlines()
            results.append(CompiledVariant(op, variant, time.perf_counter() - start,
                                           error="\n".join(message[-20:])))
            continue
        seconds = (time.perf_counter() - start) / max(1, len(compiled))
        for kernel in compiled:
            usage = _resource_usage(kernel.asm["cubin"]) if "cubin" in kernel.asm else {}
            results.append(CompiledVariant(kernel.name, variant, seconds,
                                           shared_bytes=getattr(kernel.metadata, "shared", None),
                                           **usage))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90,
                        help="CUDA compute capability as major*10+minor: 90 (H100, default), 80 (A100)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if interpreter_selected():
        print(INTERPRETER_SELECTED, file=sys.stderr)
        return 2
    import triton
    print(f"compiling fastdmd.ops' Triton kernels for sm_{args.arch} with triton {triton.__version__} "
          f"(torch {torch.__version__}), nothing is run", flush=True)
    results = check(args.arch)
    for r in results:
        if r.error:
            print(f"FAILED {r.kernel} [{r.variant}]\n    " + r.error.replace("\n", "\n    "))
        else:
            print(f"ok {r.kernel:34s} {r.variant:55s} regs={r.registers} local={r.local_bytes} "
                  f"smem={r.shared_bytes} {r.seconds:.1f}s")
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} kernels compiled, {len(failed)} variants failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
