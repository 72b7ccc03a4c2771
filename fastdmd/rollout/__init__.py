"""Samplers: the generator's few-step sampler (with backward simulation for training) and the
teacher's many-step Euler sampler (diffusers' FlowMatchEulerDiscreteScheduler).

The few-step sampler is the DMD2 one: at each noise level s_i the generator predicts x0, which is
re-noised with fresh noise to the next level; the last prediction is the sample. All shapes are
static, which is what a CUDA graph captures.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

X0Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, sigma[B], labels) -> x0


@torch.no_grad()
def few_step_sample(x0_fn: X0Fn, noise: torch.Tensor, labels: torch.Tensor, sigmas: Sequence[float],
                    generator: torch.Generator | None = None) -> torch.Tensor:
    return sample_with_draws(x0_fn, noise, labels, sigmas, renoise_draws(noise, len(sigmas) - 1, generator))


@torch.no_grad()
def sample_with_draws(x0_fn: X0Fn, noise: torch.Tensor, labels: torch.Tensor, sigmas: Sequence[float],
                      draws: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole few-step sampler with the given re-noise draws (one per step but the last): samples
    drawn in parts, each with its rows of the draws, are the samples drawn whole."""
    x = simulate(x0_fn, noise, labels, sigmas, draws)
    return x0_fn(x, torch.full((x.shape[0],), sigmas[len(draws)], device=x.device), labels)


def renoise_draws(noise: torch.Tensor, k: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """The k fresh noises that the first k steps of the sampler re-noise with, drawn in step order
    (on the generator's device: evaluation samples CUDA tensors from a fixed CPU seed)."""
    device = generator.device if generator is not None else noise.device
    return [torch.randn(noise.shape, generator=generator, device=device, dtype=noise.dtype).to(noise.device)
            for _ in range(k)]


@torch.no_grad()
def simulate(x0_fn: X0Fn, noise: torch.Tensor, labels: torch.Tensor, sigmas: Sequence[float],
             draws: Sequence[torch.Tensor]) -> torch.Tensor:
    """The first len(draws) steps of the few-step sampler with the given re-noise draws: x_{s_k}.
    Pure tensor code with static shapes: what fastdmd.rollout.graphs captures as a CUDA graph."""
    x = noise
    for i, eps in enumerate(draws):
        x0 = x0_fn(x, torch.full((x.shape[0],), sigmas[i], device=x.device), labels)
        x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
    return x


def backward_simulation(x0_fn: X0Fn, noise: torch.Tensor, labels: torch.Tensor, sigmas: Sequence[float],
                        k: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first k steps without grad and return (x_{s_k}, s_k): the input of the step that
    receives the gradient (DMD2's backward simulation)."""
    if not 0 <= k < len(sigmas):
        raise ValueError(f"backward-simulation step k must be in [0, {len(sigmas) - 1}], got {k}")
    x = simulate(x0_fn, noise, labels, sigmas, renoise_draws(noise, k, generator))
    return x, torch.full((x.shape[0],), sigmas[k], device=x.device)


def linear_sigmas(steps: int) -> list[float]:
    return [1.0 - i / steps for i in range(steps)]


@torch.no_grad()
def euler_sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 sigmas: Sequence[float]) -> torch.Tensor:
    """Flow-matching Euler from pure noise; velocity_fn(x, sigma[B]) -> v."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=list(sigmas), device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        v = velocity_fn(x, torch.full((x.shape[0],), float(t) / 1000, device=x.device))
        x = scheduler.step(v, t, x).prev_sample
    return x
