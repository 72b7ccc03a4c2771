"""No-grad model calls replayed from CUDA graphs: the rollout (backward simulation) and the DMD scores.

`CudaGraphs` wraps a pure no-grad function of CUDA tensors: one graph per input signature (shapes,
dtypes, any Python constants and the caller's autocast state), captured on first use with static input buffers; each call copies
its inputs into them, replays, and returns copies of the outputs. Weights are read in place (the
optimizer updates them in place), so one capture serves the whole run. Randomness stays outside:
the rollout's re-noise draws are made from the step's generator, in the eager path's order, and
passed in as inputs, so graph and eager rollouts see the same numbers.

Every live graph of the process shares one memory pool: a graph's scratch memory is free once it
has run, its outputs are copied out right after the replay, its inputs live outside the pool and no
two graphs run at once, so sharing costs nothing and saves a pool per graph (a new pool once no live
graph holds the last one: shared_pool).

Where a graph cannot work the call stays eager and `reason` says why (in the run header): no CUDA
device, FSDP-sharded weights (their all-gathers run outside any graph), or a capture that failed (the
error is kept, and a RuntimeWarning says so when it happens, since the header printed before the first
capture).

Blocks compiled in torch.compile's reduce-overhead mode record and replay CUDA graphs of their own
(cudagraph trees), which cannot happen inside another capture. Such a block gets a twin (`add_twin`):
the same block compiled in inductor's default mode, which the warm-up and capture here call instead
(`twins_in_place`). A whole no-grad call then replays as one graph, without the host work between
the blocks' own replays; the grad passes keep the per-block graphs. (H100, SD3-medium depth 12,
batch 4, 2026-11-27: rollout 14.2, real score 18.6, fake score 10.5 ms in phase-synchronized steps,
against 16.0, 21.6 and 14.2 ms with per-block replays; the batch-1 sample 13.6 against 20.0 ms.)
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from fastdmd.rollout import X0Fn, renoise_draws, simulate

WARMUP_ITERS = 3
_pool = None  # the memory pool that every live graph here shares (see shared_pool)
_pool_users: weakref.WeakSet = weakref.WeakSet()  # the CudaGraphs that captured into it
_twinned: weakref.WeakSet = weakref.WeakSet()  # the blocks with a twin (add_twin)


def shared_pool() -> tuple:
    """The pool for the next capture: the current one while a live graph holds it, else a new one. Once
    the last graph of a pool is gone (its trainer freed), CUDA's allocator releases the pool, and a capture
    into its old id fails (an internal assert: use_count > 0), as a second trainer in one process (the
    throughput benchmark's variants, a test) would otherwise do."""
    global _pool
    if _pool is None or not any(len(graphs) for graphs in _pool_users):
        _pool = torch.cuda.graph_pool_handle()
    return _pool


def add_twin(block: torch.nn.Module, backend: str = "inductor", options: dict | None = None) -> None:
    """Give `block`, compiled (nn.Module.compile) in a mode with CUDA graphs of its own, a twin compiled in
    inductor's default mode (the same kernels, no graphs) with `options` (perf.inductor_options), for
    `twins_in_place`. torch.compile builds the twin's code on its first call, in a capture's warm-up. The
    twin is kept on the block, as its own compiled call is (a reference cycle, freed with the block; a
    table keyed by blocks would hold them)."""
    if block._compiled_call_impl is None:
        raise ValueError(f"add_twin: {type(block).__name__} is not compiled; call block.compile(...) first")
    block._fastdmd_twin_call = torch.compile(block._call_impl, backend=backend, dynamic=False, options=options or None)
    _twinned.add(block)


@contextmanager
def twins_in_place() -> Iterator[None]:
    """Every block with a twin calls its twin inside this context (its own compiled call again after)."""
    swapped = [(block, block._compiled_call_impl) for block in list(_twinned)]
    try:
        for block, _ in swapped:
            block._compiled_call_impl = block._fastdmd_twin_call
        yield
    finally:
        for block, own in swapped:
            block._compiled_call_impl = own


def graph_blocker(option: str, enabled: bool, device: torch.device, distributed: bool = False) -> str | None:
    """Why calls configured by `option` cannot replay CUDA graphs here; None when they can."""
    if not enabled:
        return f"off ({option} false)"
    if device.type != "cuda":
        return f"eager: CUDA graphs need a CUDA device, the run is on {device.type}"
    if distributed:
        return "eager: FSDP-sharded weights are all-gathered outside any graph"
    return None


class CudaGraphs:
    """`fn(*tensors, *constants)` without grad, replayed from a CUDA graph per (shapes, dtypes, constants,
    autocast state)."""

    def __init__(self, fn: Callable, reason: str | None, name: str):
        self.fn, self.reason, self.name = fn, reason, name
        self._graphs: dict[tuple, tuple] = {}

    @property
    def active(self) -> bool:
        return self.reason is None

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, *tensors: torch.Tensor, constants: tuple = ()):
        if not self.active:
            return self.fn(*tensors, *constants)
        # A capture bakes in the caller's autocast state (on or off, dtype): part of the key.
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = tuple((t.shape, t.dtype) for t in tensors) + tuple(constants) + autocast
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(tensors, constants)
            except Exception as e:  # noqa: BLE001 - any capture failure means: stay eager, say why
                # CUDA errors append lines of advice: the first line says what failed
                first_line = next(iter(str(e).strip().splitlines()), "")
                self.reason = f"eager: CUDA graph capture failed ({type(e).__name__}: {first_line})"
                self._graphs.clear()
                # The run header, printed before the first capture, said "CUDA graph".
                warnings.warn(f"{self.name}: {self.reason}; running eagerly from now on", RuntimeWarning,
                              stacklevel=2)
                return self.fn(*tensors, *constants)
        graph, static_inputs, static_out = self._graphs[key]
        for buffer, tensor in zip(static_inputs, tensors):
            buffer.copy_(tensor)
        graph.replay()
        return _clone(static_out)

    @torch.no_grad()
    def _capture(self, tensors, constants):
        static_inputs = [t.clone() for t in tensors]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), uncached_autocast("cuda"), twins_in_place():
            for _ in range(WARMUP_ITERS):
                self.fn(*static_inputs, *constants)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pool = shared_pool()
        with torch.cuda.graph(graph, pool=pool), uncached_autocast("cuda"), twins_in_place():
            static_out = self.fn(*static_inputs, *constants)
        _pool_users.add(self)
        return graph, static_inputs, static_out


def _clone(out):
    if isinstance(out, tuple):
        return tuple(None if o is None else o.clone() for o in out)
    return out.clone()


class GraphedRollout:
    """The rollout of backward simulation: x_{s_k} from noise, labels and k re-noise draws; one graph per k."""

    def __init__(self, x0_fn: X0Fn, sigmas: Sequence[float], enabled: bool, device: torch.device,
                 distributed: bool = False):
        self.x0_fn, self.sigmas = x0_fn, tuple(sigmas)
        self.graphs = CudaGraphs(self._simulate, graph_blocker("perf.cuda_graph_rollout", enabled, device,
                                                               distributed), "rollout")

    @property
    def active(self) -> bool:
        return self.graphs.active

    @property
    def reason(self) -> str | None:
        return self.graphs.reason

    def _simulate(self, noise: torch.Tensor, labels: torch.Tensor, *draws: torch.Tensor) -> torch.Tensor:
        return simulate(self.x0_fn, noise, labels, self.sigmas, draws)

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor, k: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= k < len(self.sigmas):
            raise ValueError(f"backward-simulation step k must be in [0, {len(self.sigmas) - 1}], got {k}")
        draws = renoise_draws(noise, k, generator)
        sigma = torch.full((noise.shape[0],), self.sigmas[k], device=noise.device)
        if k == 0:  # no generator call: x_{s_0} is the noise
            return simulate(self.x0_fn, noise, labels, self.sigmas, draws), sigma
        return self.graphs(noise, labels, *draws), sigma


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
