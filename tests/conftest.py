"""Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported."""

import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
