"""Host-side cost of fastdmd.ops.dmd_target's Triton path, its kernel launches stubbed out: only our Python,
torch.library's custom-op dispatch and the allocations are timed, and then the pieces found in them. Runs
anywhere (the interpreter's kernels are never launched); a CUDA host runs the same Python faster.

    python benchmarks/dmd_target_host_overhead.py   # results: benchmarks/results/dmd_target_host_overhead_*.md
"""
import os
import platform
import sys
import timeit
from datetime import datetime, timezone

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's import: no GPU needed, none is used

import torch  # noqa: E402
import torch._library.utils as library_utils  # noqa: E402
import triton  # noqa: E402

from fastdmd.ops import dmd_target_triton as m  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


for name in ("_dmd_one_pass_kernel", "_p_real_abs_sum_kernel", "_dmd_elementwise_kernel", "_dmd_finalize_kernel",
             "_dmd_backward_kernel"):
    setattr(m, name, _NoLaunch())
m.check_kernel_device = lambda *args, **kwargs: None
batch, shape = 64, (64, 16, 8, 8)
x0, x_t, cond, uncond, fake = (torch.randn(shape) for _ in range(5))
x0_grad = x0.clone().requires_grad_()
a, b = torch.rand(batch), torch.rand(batch)


def per_call_us(fn, number=2000):
    for _ in range(50):
        fn()
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


schema = torch.ops.fastdmd.dmd_target.default._schema
print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')} | {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores, {torch.get_num_threads()} threads | python {platform.python_version()} | torch "
      f"{torch.__version__} | triton {triton.__version__} | command: {' '.join([sys.executable, *sys.argv])}")
no_grad_us = per_call_us(lambda: m.dmd_target(x0, x_t, cond, uncond, fake, a, b, 4.5))
print(f"dmd_target, no grad, launches stubbed: {no_grad_us:.1f} us/call")
print(f"dmd_target, x0 requires grad, launches stubbed: "
      f"{per_call_us(lambda: m.dmd_target(x0_grad, x_t, cond, uncond, fake, a, b, 4.5)):.1f} us/call")
print(f"torch.library fill_defaults on the op's schema ({len(schema.arguments)} arguments): "
      f"{per_call_us(lambda: library_utils.fill_defaults(schema, tuple(range(13)), {})):.1f} us/call")
print(f"  of which one schema.arguments access: {per_call_us(lambda: schema.arguments):.2f} us")
print(f"triton.cdiv ({type(triton.cdiv).__name__}): {per_call_us(lambda: triton.cdiv(1000, 7), 20000):.2f} us/call")
print(f"triton.next_power_of_2: {per_call_us(lambda: triton.next_power_of_2(1000), 20000):.2f} us/call")
print(f"plain (1000 + 6) // 7: {per_call_us(lambda: (1000 + 6) // 7, 20000):.3f} us/call")
