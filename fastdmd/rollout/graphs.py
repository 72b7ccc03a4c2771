"""The no-grad rollout (backward simulation) replayed from CUDA graphs.

One graph per static shape and step count k: static buffers hold the starting noise, the labels
and the k re-noise draws; each training step copies its inputs into them and replays. The draws are
made outside the graph from the step's generator, in the same order as the eager path, so graph and
eager rollouts see the same numbers. The generator's weights are read in place (the optimizer
updates them in place), so one capture serves the whole run.

Where a graph cannot work the rollout stays eager and `reason` says why (logged once in the run
header): no CUDA device, FSDP-sharded weights (their all-gathers run outside any graph), blocks
that torch.compile already replays from CUDA graphs (reduce-overhead), or a capture that failed
(the error is kept).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastdmd.rollout import X0Fn, renoise_draws, simulate

WARMUP_ITERS = 3


class GraphedRollout:
    def __init__(self, x0_fn: X0Fn, sigmas: Sequence[float], enabled: bool, device: torch.device,
                 distributed: bool = False, blocks_graphed: bool = False):
        self.x0_fn, self.sigmas = x0_fn, tuple(sigmas)
        self.reason = None
        if not enabled:
            self.reason = "off (perf.cuda_graph_rollout false)"
        elif blocks_graphed:
            self.reason = "eager: the compiled blocks replay CUDA graphs of their own (perf.compile_mode reduce-overhead)"
        elif device.type != "cuda":
            self.reason = f"eager: CUDA graphs need a CUDA device, the run is on {device.type}"
        elif distributed:
            self.reason = "eager: FSDP-sharded weights are all-gathered outside any graph"
        self.graphs: dict[tuple, tuple] = {}
        # One memory pool for all of them (one per k and shape): a graph's scratch memory is free once
        # it has run, its output is copied out right after the replay, and the graphs never run at
        # once, so sharing costs nothing and saves a pool per extra graph.
        self._pool = None

    @property
    def active(self) -> bool:
        return self.reason is None

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor, k: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= k < len(self.sigmas):
            raise ValueError(f"backward-simulation step k must be in [0, {len(self.sigmas) - 1}], got {k}")
        draws = renoise_draws(noise, k, generator)
        sigma = torch.full((noise.shape[0],), self.sigmas[k], device=noise.device)
        if not self.active or k == 0:
            return simulate(self.x0_fn, noise, labels, self.sigmas, draws), sigma
        key = (k, tuple(noise.shape), noise.dtype, labels.dtype)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(noise, labels, draws)
            except Exception as e:  # noqa: BLE001 - any capture failure means: stay eager, say why
                self.reason = f"eager: CUDA graph capture failed ({type(e).__name__}: {e})"
                return simulate(self.x0_fn, noise, labels, self.sigmas, draws), sigma
        graph, static_noise, static_labels, static_draws, static_out = self.graphs[key]
        static_noise.copy_(noise)
        static_labels.copy_(labels)
        for buffer, draw in zip(static_draws, draws):
            buffer.copy_(draw)
        graph.replay()
        return static_out.clone(), sigma

    @torch.no_grad()
    def _capture(self, noise, labels, draws):
        static_noise, static_labels = noise.clone(), labels.clone()
        static_draws = [d.clone() for d in draws]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), uncached_autocast("cuda"):
            for _ in range(WARMUP_ITERS):
                simulate(self.x0_fn, static_noise, static_labels, self.sigmas, static_draws)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool), uncached_autocast("cuda"):
            static_out = simulate(self.x0_fn, static_noise, static_labels, self.sigmas, static_draws)
        return graph, static_noise, static_labels, static_draws, static_out


def uncached_autocast(device_type: str) -> torch.autocast:
    """The caller's autocast state (on or off, its dtype) with autocast's weight-cast cache off.

    A captured graph must cast the fp32 weights itself, into its own memory, at every replay. With
    the cache on, a cast made before the capture (in the warm-up, or earlier in the caller's autocast
    region) is reused by the graph, which then reads memory that is freed when that autocast region
    ends: stale weights at best, an illegal address once the allocator has released it (what
    benchmarks/step_throughput.py's optimized variant hit on an H100 under bf16 autocast). The
    nested region leaves the caller's cache as it was."""
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)
