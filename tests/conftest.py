"""Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported."""

import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def _session_threads() -> int:
    import torch  # here, not at the top: TRITON_INTERPRET must be set before anything imports triton

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads(_session_threads):
    """An in-process `main([..., "--threads", "1"])` (in a test, or in a module fixture's setup) sets torch's thread
    count for the rest of the session: put the session's back after each test, so that later tests run with the
    machine's threads (on 2 cores the 100-step learning test took 262 s after test_perf's module fixture, 147 s
    alone)."""
    import torch

    yield
    torch.set_num_threads(_session_threads)
