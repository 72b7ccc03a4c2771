"""Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported."""

import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """An in-process `main([..., "--threads", "1"])` sets torch's thread count for the rest of the session: put it
    back, so that later tests run with the machine's threads (on 2 cores the 100-step learning test took 273 s
    after such a test, 149 s alone)."""
    import torch  # here, not at the top: TRITON_INTERPRET must be set before anything imports triton

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
