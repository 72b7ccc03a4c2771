"""The Triton kernels compile for an H100 (sm_90) with Triton's real compiler, here, with no GPU.

The other op tests run the kernels in the Triton interpreter on CPU, which accepts code the compiler
rejects; fastdmd.ops.compile_check compiles every kernel variant instead (nothing runs). Each check
runs in a fresh process: TRITON_INTERPRET, which conftest sets for this process, must be unset
before triton is imported, and a private Triton cache makes every run compile for real.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastdmd.ops.compile_check import nvidia_tool

# Every @triton.jit kernel of fastdmd/ops launched by the ops.
KERNELS = {
    "_p_real_abs_sum_kernel", "_dmd_elementwise_kernel", "_dmd_one_pass_kernel", "_dmd_finalize_kernel",
    "_dmd_backward_kernel",
    "_group_advantages_kernel", "_squared_deviation_sum_kernel", "_policy_loss_kernel",
    "_policy_loss_backward_kernel", "_master_adamw_kernel",
}


def _compiler_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return env


pytestmark = pytest.mark.skipif(nvidia_tool("ptxas") is None and "TRITON_PTXAS_PATH" not in os.environ,
                                reason="no NVIDIA ptxas (neither shipped with triton nor on PATH)")


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "fastdmd.ops.compile_check", "--arch", "90",
                           "--json", str(out)], env=_compiler_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert not [r for r in results if r["error"]]
    assert {r["kernel"] for r in results} == KERNELS
    # Every kernel really went through ptxas: a cubin with a register count, no local-memory spills.
    for r in results:
        if r["registers"] is not None:
            assert 0 < r["registers"] <= 255, r
            assert r["local_bytes"] == 0, r


def test_compile_check_rejects_what_the_interpreter_runs(tmp_path):
    (tmp_path / "toy_kernel.py").write_text(textwrap.dedent("""
        import torch
        import triton
        import triton.language as tl


        @triton.jit
        def _sum_blocks_kernel(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
            acc = 0  # an int, then a float block: the compiler refuses the type change in the loop
            # N constexpr: triton 3.6's interpreter cannot take `range` over a runtime bound
            for start in range(0, N, BLOCK):
                acc += tl.load(x_ptr + start + tl.arange(0, BLOCK))
            tl.store(out_ptr + tl.arange(0, BLOCK), acc)


        def launch():
            out = torch.empty(16)
            _sum_blocks_kernel[(1,)](torch.ones(64), out, N=64, BLOCK=16)
            return out
    """))
    interpreted = subprocess.run(
        [sys.executable, "-c", "import toy_kernel; print(toy_kernel.launch().tolist())"],
        cwd=tmp_path, env={**_compiler_env(tmp_path), "TRITON_INTERPRET": "1"}, capture_output=True,
        text=True, timeout=300)
    assert interpreted.returncode == 0, interpreted.stderr[-2000:]
    assert interpreted.stdout.strip() == str([4.0] * 16)

    compiled = subprocess.run(
        [sys.executable, "-c", "import toy_kernel\n"
                               "from fastdmd.ops.compile_check import compile_only\n"
                               "with compile_only(90, []):\n"
                               "    toy_kernel.launch()\n"],
        cwd=tmp_path, env=_compiler_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert compiled.returncode != 0
    assert "Loop-carried variable acc" in compiled.stderr, compiled.stderr[-2000:]
