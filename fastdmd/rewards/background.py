"""Score a reward on a worker thread, so a slow reward model does not stall the training step.

For rewards used without their gradient (group advantages, logging): `submit` detaches and copies
the images, returns a `concurrent.futures.Future` at once, and one worker thread scores them in
submission order while the caller goes on (e.g. with the critic update); `.result()` gives the
scores [B] fp32. PyTorch releases the GIL inside its ops, so a reward model on another device
(CLIPReward(device="cuda:1")) or in native code runs in parallel with the step; a reward written
in Python (JPEG's per-image loop) only partly does. A thread, not a process: the model is loaded
once and shared, and no tensors are pickled. Errors of the reward surface from `.result()`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fastdmd.ops import DMDTarget
from fastdmd.rewards.base import Reward


class BackgroundReward:
    """`submit(images, labels, dmd=None) -> Future[scores]`, scored by one worker thread; `close()` at the end."""

    def __init__(self, reward: Reward):
        self.reward = reward
        self.name = reward.name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{reward.name}")

    def submit(self, images: torch.Tensor, labels: torch.Tensor, dmd: DMDTarget | None = None) -> Future:
        # A copy: the caller may overwrite its buffers (e.g. CUDA-graph static outputs) before the worker reads them.
        images, labels = images.detach().clone(), labels.clone()
        return self._pool.submit(self._score, images, labels, dmd)

    def _score(self, images, labels, dmd) -> torch.Tensor:
        with torch.no_grad():
            return self.reward(images, labels, dmd)

    def close(self) -> None:
        """Wait for the submitted batches and stop the worker."""
        self._pool.shutdown(wait=True)
