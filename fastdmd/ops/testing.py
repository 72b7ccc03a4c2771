"""What the op tests share: the tolerance rule, per-dtype atol, the device to test on.

The tolerance rule is flash-attention's: a kernel is correct when its largest error against the
exact result (the reference in fp64) is at most twice the largest error of plain PyTorch at the
input precision, plus a small atol for the cases where PyTorch happens to be exact:

    max|kernel - exact| <= 2 * max|torch_lowprec - exact| + atol * max|exact|
"""

from __future__ import annotations

import contextlib

import torch

from fastdmd.ops import sample_chunks

# Relative to the largest exact value: about 100 ulp for fp32 (the kernels sum in another order
# than torch); for fp16 and bf16 one ulp of the output format, the final rounding (which the Triton
# interpreter does by truncation for bf16, where the GPU rounds to nearest).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def default_device() -> torch.device:
    """CUDA when there is a GPU (kernels compiled), else CPU (kernels in the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_no_worse_than_torch(name: str, actual: torch.Tensor, exact: torch.Tensor,
                               lowprec: torch.Tensor, dtype: torch.dtype) -> None:
    """The flash-attention rule above; non-finite values must sit where the exact result has them."""
    actual, exact, lowprec = (t.detach().to("cpu", torch.float64) for t in (actual, exact, lowprec))
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    finite = torch.isfinite(exact)
    infinite = exact.isinf()
    same_non_finite = (torch.equal(actual.isnan(), exact.isnan())
                       and torch.equal(actual[infinite], exact[infinite])
                       and bool(torch.isfinite(actual[finite]).all()))
    assert same_non_finite, f"{name}: non-finite values differ from the exact result"
    if not finite.any():
        return
    error = (actual - exact)[finite].abs().max().item()
    # Where PyTorch itself overflows, its error says nothing about what is achievable: skip those.
    comparable = finite & torch.isfinite(lowprec)
    torch_error = (lowprec - exact)[comparable].abs().max().item() if comparable.any() else 0.0
    scale = exact[finite].abs().max().item()
    bound = 2 * torch_error + ATOL[dtype] * scale
    assert error <= bound, (f"{name}: max error {error:.3g} > {bound:.3g} = 2 * torch {dtype} error "
                            f"{torch_error:.3g} + atol {ATOL[dtype]} * {scale:.3g}")


@contextlib.contextmanager
def small_chunks(block: int = 32, max_chunks: int = 4):
    """Shrink the kernels' blocks so tiny inputs exercise multi-block, multi-chunk programs."""
    saved = sample_chunks.BLOCK, sample_chunks.MAX_CHUNKS
    sample_chunks.BLOCK, sample_chunks.MAX_CHUNKS = block, max_chunks
    try:
        yield
    finally:
        sample_chunks.BLOCK, sample_chunks.MAX_CHUNKS = saved
