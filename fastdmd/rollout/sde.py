"""The stochastic few-step sampler of the policy-gradient methods, with per-step log-probabilities
(METHODS.md, "RTDMD" stage 2; also GNDM's importance sampling).

Where it sits: the rollout phase of an RL step. `sde_rollout` runs the generator's few-step
schedule as coefficient-preserving (CPS) SDE steps without grad and stores, for every step, the
state, the Gaussian mean and std of the transition and its fp32 log-probability. The update phase
recomputes one step's mean with grad (`policy_loss`) and hands it to `ops.clipped_policy_loss`
with the stored log-prob: on-policy, the ratio is exactly 1.

CPS step from x at sigma s with velocity v (flow convention x_s = (1 - s) x0 + s eps, v = eps - x0):
    x0 = x - s v,  eps_hat = x + (1 - s) v,
    x' = (1 - s') x0 + s' cos(eta pi/2) eps_hat + s' sin(eta pi/2) xi,   xi ~ N(0, I).
Mean = the first two terms, std = s' sin(eta pi/2) per sample. eta = 0 is the Euler (DDIM) step
x' = x + (s' - s) v; eta = 1 re-noises x0 with fresh noise (the DMD2 sampler). The last step goes
to s' = 0 and is deterministic (x' = x0, std 0): its ratio would always be 1, so RTDMD trains it
with AC-DMD and reward backprop instead.

SubGRPO (RTDMD): per epoch only `num_trained` of the stochastic steps are trained
(`subgrpo_steps`); the others draw noise shared by all samples of a group (`group_shared_noise`),
so the group's reward differences come from the trained steps alone.

Log-probs follow `ops.clipped_policy_loss` (the mean over elements of the Gaussian log-density,
in fp32) and are computed by that op itself (`step_log_prob`), so rollout and update use one
implementation. The CPS arithmetic runs in fp32 (fp64 kept) whatever the model's dtype, so the
stored states, means and log-probs are exactly the fp32 values the update phase recomputes
(METHODS.md: bf16 log-probs give NaN and on-policy ratios != 1).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from fastdmd import ops
from fastdmd.ops.checks import check_number, check_tensor

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma[B], labels) -> v


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A sigma (float or [B] tensor) as a [B, 1, ...] tensor that broadcasts against `like`."""
    batch = like.shape[0]
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        value = value.expand(batch)
    if tuple(value.shape) != (batch,):
        raise ValueError(f"a sigma must be a float or a [B] tensor with B={batch}, got shape {tuple(value.shape)}")
    return value.reshape(batch, *([1] * (like.dim() - 1)))


class CPSStep(NamedTuple):
    x_next: torch.Tensor  # [B, ...] mean + std * noise
    mean: torch.Tensor    # [B, ...] the deterministic part
    std: torch.Tensor     # [B] s' * sin(eta * pi / 2)


def cps_mean_std(x: torch.Tensor, v: torch.Tensor, s, s_next, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-sample std of one CPS step from sigma s to s_next (floats or [B] tensors).
    Differentiable w.r.t. v (and x): the update phase calls this with grad."""
    check_number("eta", eta, minimum=0)
    if eta > 1:
        raise ValueError(f"eta must be in [0, 1] (0: Euler/DDIM step, 1: full re-noise), got {eta!r}")
    if v.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(v.shape)} must match the state shape {tuple(x.shape)}")
    dtype = _compute_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    s, s_next = _per_sample(s, x), _per_sample(s_next, x)
    x0 = x - s * v
    eps_hat = x + (1 - s) * v
    mean = (1 - s_next) * x0 + s_next * math.cos(eta * math.pi / 2) * eps_hat
    std = s_next.reshape(-1) * math.sin(eta * math.pi / 2)
    return mean, std


def cps_step(x: torch.Tensor, v: torch.Tensor, s, s_next, eta: float, noise: torch.Tensor) -> CPSStep:
    """One CPS step with the given standard-normal noise xi."""
    mean, std = cps_mean_std(x, v, s, s_next, eta)
    if noise.shape != mean.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must match the state shape {tuple(mean.shape)}")
    x_next = mean + std.reshape(-1, *([1] * (mean.dim() - 1))) * noise.to(mean.dtype)
    return CPSStep(x_next, mean, std)


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B] fp32: mean over elements of log N(x_next; mean, std^2), computed by
    ops.clipped_policy_loss (its `log_prob`), the same code that later forms the ratio."""
    zeros = torch.zeros(x_next.shape[0], dtype=torch.float32, device=x_next.device)
    return ops.clipped_policy_loss(x_next, mean, std, zeros, zeros, 0.0).log_prob


class Rollout(NamedTuple):
    sample: torch.Tensor       # [B, ...] the final x0 (output of the deterministic last step)
    trajectory: torch.Tensor   # [T + 1, B, ...] states: the input noise, x_1, ..., x_T = sample
    means: torch.Tensor        # [T, B, ...] mean of each transition
    stds: torch.Tensor         # [T, B] std of each transition (0 at deterministic steps)
    log_probs: torch.Tensor    # [T, B] fp32 log-prob of each transition; NaN at deterministic steps
    sigmas: tuple[float, ...]  # T + 1 noise levels, the last one 0
    stochastic: tuple[int, ...]  # the steps taken with eta > 0 (those with a log-prob)
    eta: float


def _check_sigmas(sigmas: Sequence[float]) -> tuple[float, ...]:
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or not all(0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be strictly decreasing values in (0, 1] (the generator's schedule, "
                         f"e.g. [1.0, 0.75, 0.5, 0.25]), got {list(sigmas)}")
    return sigmas + (0.0,)


@torch.no_grad()
def sde_rollout(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, sigmas: Sequence[float],
                eta: float, generator: torch.Generator | None = None, stochastic_steps: Sequence[int] | None = None,
                shared_noise: Mapping[int, torch.Tensor] | None = None) -> Rollout:
    """Run T = len(sigmas) CPS steps from `noise` (at sigmas[0]) down to sigma 0, without grad.

    Step i goes from sigmas[i] to sigmas[i + 1] (0 after the last). `stochastic_steps` (default:
    every step but the last) take the SDE step with `eta`; the other steps take the Euler step
    (eta 0) and the last step is always the deterministic jump to x0. A stochastic step uses
    `shared_noise[i]` when given (SubGRPO's untrained steps, see `group_shared_noise`), else fresh
    per-sample noise from `generator`, drawn in step order.
    """
    check_tensor("noise", noise, dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64))
    levels = _check_sigmas(sigmas)
    num_steps = len(levels) - 1
    stochastic = tuple(range(num_steps - 1)) if stochastic_steps is None else tuple(sorted(set(stochastic_steps)))
    if any(not 0 <= i < num_steps - 1 for i in stochastic):
        raise ValueError(f"stochastic_steps must lie in [0, {num_steps - 2}] (the last of the {num_steps} steps "
                         f"is deterministic), got {list(stochastic_steps)}")
    if stochastic and not eta > 0:
        raise ValueError(f"eta must be in (0, 1] when there are stochastic steps ({list(stochastic)}): "
                         f"eta = 0 gives std 0 and no log-prob; got {eta!r}")
    shared_noise = dict(shared_noise or {})
    if set(shared_noise) - set(stochastic):
        raise ValueError(f"shared_noise is given for steps {sorted(set(shared_noise) - set(stochastic))}, "
                         f"which are not stochastic steps {list(stochastic)}")
    for i, xi in shared_noise.items():
        check_tensor(f"shared_noise[{i}]", xi, dtypes=(noise.dtype, torch.float32), shape=noise.shape,
                     device=noise.device)

    x = noise.to(_compute_dtype(noise))
    states, means, stds, log_probs = [x], [], [], []
    for i in range(num_steps):
        s, s_next = levels[i], levels[i + 1]
        v = velocity_fn(x, torch.full((x.shape[0],), s, device=x.device), labels)
        if i in stochastic:
            xi = shared_noise.get(i)
            if xi is None:
                xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            step = cps_step(x, v, s, s_next, eta, xi)
            log_prob = step_log_prob(step.x_next, step.mean, step.std)
        else:
            mean, std = cps_mean_std(x, v, s, s_next, 0.0)
            step = CPSStep(mean, mean, std)
            log_prob = torch.full((x.shape[0],), float("nan"), device=x.device)
        x = step.x_next
        states.append(x)
        means.append(step.mean)
        stds.append(step.std)
        log_probs.append(log_prob)
    return Rollout(x, torch.stack(states), torch.stack(means), torch.stack(stds), torch.stack(log_probs),
                   levels, stochastic, float(eta))


def policy_loss(velocity_fn: VelocityFn, rollout: Rollout, step: int, labels: torch.Tensor,
                advantages: torch.Tensor, clip_range: float) -> ops.PolicyLoss:
    """The update phase for one stochastic step of a stored rollout: recompute the step's mean with
    grad from the current policy and form the PPO clipped loss against the stored log-prob."""
    if step not in rollout.stochastic:
        raise ValueError(f"step {step} is not a stochastic step of this rollout ({list(rollout.stochastic)}); "
                         f"deterministic steps have no log-prob to form a ratio with")
    x, s, s_next = rollout.trajectory[step], rollout.sigmas[step], rollout.sigmas[step + 1]
    v = velocity_fn(x, torch.full((x.shape[0],), s, device=x.device), labels)
    mean, std = cps_mean_std(x, v, s, s_next, rollout.eta)
    return ops.clipped_policy_loss(rollout.trajectory[step + 1], mean, std, rollout.log_probs[step],
                                   advantages, clip_range)


def _seeded(*keys: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def subgrpo_steps(num_stochastic: int, num_trained: int, epoch: int, seed: int) -> list[int]:
    """SubGRPO: the `num_trained` of the `num_stochastic` stochastic steps trained in `epoch`, sorted;
    a deterministic function of (seed, epoch), different draws across epochs. RTDMD: 2 of {0, 1, 2}."""
    for name, value in (("num_stochastic", num_stochastic), ("num_trained", num_trained), ("epoch", epoch),
                        ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not 1 <= num_trained <= num_stochastic:
        raise ValueError(f"num_trained must be in [1, num_stochastic={num_stochastic}], got {num_trained}")
    order = torch.randperm(num_stochastic, generator=_seeded(seed, epoch))
    return sorted(order[:num_trained].tolist())


def group_shared_noise(steps: Sequence[int], group_seeds: Sequence[int], group_size: int,
                       sample_shape: Sequence[int], epoch: int, device=None,
                       dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
    """SubGRPO's shared noise for the untrained `steps`: {step: [G * group_size, *sample_shape]}, the
    same draw for every sample of a group (contiguous groups, as ops.group_advantages' group_size),
    seeded from (group seed, step, epoch). Drawn on the CPU, so identical on every device.
    Group seeds are non-negative ints that identify the group's prompt or class within the run
    (e.g. derived from the run seed, the class and the rollout batch)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not group_seeds or any(int(g) < 0 for g in group_seeds):
        raise ValueError(f"group_seeds must be a non-empty list of non-negative ints, got {list(group_seeds)}")
    noise = {}
    for step in steps:
        draws = [torch.randn(tuple(sample_shape), generator=_seeded(g, step, epoch)) for g in group_seeds]
        noise[int(step)] = torch.stack(draws).repeat_interleave(group_size, dim=0).to(device=device, dtype=dtype)
    return noise
