"""The native backend (`fastdmd.ops.backend = "native"`): the C++/CUDA kernels of kernels/.

A third implementation of dmd_target and group_advantages beside the Triton kernels
(ops/<op>_triton.py) and the references (ops/reference.py): same arguments, same results, same
ValueErrors (the wrappers below call ops/checks.py first). CMakeLists.txt builds kernels/ into a
library that registers the ops fastdmd_native::dmd_target, ::dmd_target_backward and
::group_advantages with TORCH_LIBRARY: CPU kernels always, CUDA kernels when built with
FASTDMD_CUDA. This module loads it on first use and adds what torch.compile and autograd need, as
the Triton ops do: fake implementations, and dmd_target's backward (d x0 = d_loss * w * residual / N
from the fp32 residual x0 - target that the forward saves when x0 requires grad; d weights from the
per-sample sums of residual^2).

The library is $FASTDMD_NATIVE_LIB, or else build/native/libfastdmd_native.so in the source
checkout; build it from the repository root with

    cmake -S . -B build/native -DPython_EXECUTABLE="$(python -c 'import sys; print(sys.executable)')"
    cmake --build build/native -j2

`pip install` never builds it, and importing this module never needs it: the import loads the
library when it exists (so that code compiled with torch.compile finds the ops registered), and
the first call of an op raises a RuntimeError with the commands above when it does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from fastdmd.ops.checks import KERNEL_DTYPES, check_dmd_target_inputs, check_group_advantages_inputs
from fastdmd.ops.op_contracts import (
    dmd_target_backward, dmd_target_backward_fake, dmd_target_constants, dmd_target_fake, dmd_target_setup_context,
    group_advantages_fake,
)
from fastdmd.ops.reference import DMDTarget, GroupAdvantages

LIBRARY_ENV = "FASTDMD_NATIVE_LIB"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "native" / "libfastdmd_native.so"
BUILD_COMMANDS = ("cmake -S . -B build/native -DPython_EXECUTABLE=\"$(python -c 'import sys; "
                  "print(sys.executable)')\"\n    cmake --build build/native -j2")
_OPS = ("dmd_target", "dmd_target_backward", "group_advantages")

_loaded: Optional[Path] = None
# Device types the loaded library has kernels for ("cpu", and "cuda" in a FASTDMD_CUDA build).
_devices: frozenset[str] = frozenset()


def library_path() -> Path:
    """Where the library is looked for: $FASTDMD_NATIVE_LIB, else the default build directory."""
    return Path(os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY)


def load() -> Path:
    """Load the library (once) and register its fake and autograd implementations; its path.

    Raises RuntimeError, with the commands that build it, when it is missing or cannot be loaded.
    """
    global _loaded, _devices
    if _loaded is not None:
        return _loaded
    path = library_path()
    if not path.is_file():
        raise RuntimeError(
            f"ops.backend = 'native' needs the native library, and {path} does not exist "
            f"(${LIBRARY_ENV} {'is set' if os.environ.get(LIBRARY_ENV) else 'is not set'}). "
            f"Build it from the repository root:\n    {BUILD_COMMANDS}\nor set {LIBRARY_ENV} to "
            f"a built libfastdmd_native.so, or use fastdmd.ops.backend = 'triton' or 'reference'")
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        raise RuntimeError(
            f"could not load the native library {path} ({error}); it may have been built against "
            f"another torch than {torch.__version__}: rebuild it from the repository root:\n"
            f"    rm -rf build/native\n    {BUILD_COMMANDS}") from error
    _register_fake_and_autograd()
    has_kernels = torch._C._dispatch_has_kernel_for_dispatch_key
    _devices = frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                         if all(has_kernels(f"fastdmd_native::{op}", key) for op in _OPS))
    _loaded = path
    return path


def devices() -> frozenset[str]:
    """The device types ("cpu", "cuda") the library has kernels for; loads it."""
    load()
    return _devices


def _check_device(device: torch.device) -> None:
    if device.type != "meta" and device.type not in devices():
        raise ValueError(f"the native library {_loaded} has no kernels for tensors on {device} "
                         f"(it has: {', '.join(sorted(_devices))}); build it with "
                         f"-DFASTDMD_CUDA=ON on a machine with a CUDA torch and nvcc, or use "
                         f"fastdmd.ops.backend = 'triton'")


def _native_dmd_target_backward(residual, d_loss, weights, x0_dtype):
    return torch.ops.fastdmd_native.dmd_target_backward(residual, d_loss, weights, x0_dtype)


def _register_fake_and_autograd() -> None:
    torch.library.register_fake("fastdmd_native::dmd_target", dmd_target_fake)
    torch.library.register_fake("fastdmd_native::dmd_target_backward", dmd_target_backward_fake)
    torch.library.register_fake("fastdmd_native::group_advantages", group_advantages_fake)
    torch.library.register_autograd("fastdmd_native::dmd_target", dmd_target_backward(_native_dmd_target_backward),
                                    setup_context=dmd_target_setup_context)


def dmd_target(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    real_cond: torch.Tensor,
    real_uncond: Optional[torch.Tensor],
    fake: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    guidance_scale: float = 1.0,
    weights: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    c: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> DMDTarget:
    """Native version of fastdmd.ops.reference.dmd_target (same arguments, same result)."""
    check_dmd_target_inputs(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights,
                            noise, c, eps, dtypes=KERNEL_DTYPES)
    _check_device(x0.device)
    save_residual = torch.is_grad_enabled() and x0.requires_grad
    x_t, real_cond, real_uncond, fake, a, b, noise, c = dmd_target_constants(x_t, real_cond, real_uncond, fake, a, b,
                                                                              noise, c)
    loss, target, normalizer, grad_sq, cosine, _, _ = torch.ops.fastdmd_native.dmd_target(
        x0, x_t, real_cond, real_uncond, fake, a, b, float(guidance_scale), weights, noise, c,
        float(eps), save_residual)
    return DMDTarget(loss, target.detach(), normalizer.detach(), grad_sq.detach(), cosine.detach())


def group_advantages(
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    clip: Optional[float] = 5.0,
) -> GroupAdvantages:
    """Native version of fastdmd.ops.reference.group_advantages (same arguments, same result).

    Advantages are constants of the policy gradient: rewards and weights are detached, as in the
    reference.
    """
    check_group_advantages_inputs(rewards, group_size, group_ids, weights, eps, clip,
                                  dtypes=KERNEL_DTYPES)
    _check_device(rewards.device)
    weights = None if weights is None else weights.detach()
    return GroupAdvantages(*torch.ops.fastdmd_native.group_advantages(
        rewards.detach(), None if group_size is None else int(group_size), group_ids, weights, float(eps),
        None if clip is None else float(clip)))


if library_path().is_file():
    try:
        load()
    except RuntimeError:
        pass  # raised again, with the same message, by the first call of an op
