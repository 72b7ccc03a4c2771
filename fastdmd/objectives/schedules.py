"""DMDR's two annealed schedules (METHODS.md, "DMDR"), as in its public code (train_cc/sit/utils.py
and train_sitxl_refl_deepspeed.py): both follow the cosine decay c(step) = 0.5 * (1 + cos(pi * p)),
p = min(step / total, 1), which falls from 1 at step 0 to 0 at step `total` and stays 0 after.

- Dynamic renoise sampling: the DM noise level (for the DMD loss and the critic's denoising loss)
  is drawn from Beta(alpha', beta') with alpha' = 1 + (alpha - 1) c, beta' = 1 + (beta - 1) c:
  Beta(4, 1.5) (mean 0.73, heavy noise) at step 0, U(0, 1) = Beta(1, 1) from step `total` on
  [total = 10k on ImageNet]. In the code the sample is the flow sigma itself.
- Dynamic distribution guidance: the real score is the teacher plus the critic's LoRA at scale
  start * c [start = 0.75], so early on the real distribution sits nearer the fake one.

`step` is the global generator step, counted from 0 (the code anneals from step 0, not from the
end of the cold start).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdmd.ops.checks import check_number

DMDR_RENOISE_START = (4.0, 1.5)
DMDR_REAL_LORA_SCALE = 0.75


def cosine_decay(step: int, total: int) -> float:
    """0.5 * (1 + cos(pi * min(step / total, 1))): 1 at step 0, 0 from step `total` on."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"the annealing length total must be a positive int (steps), got {total!r}")
    return 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))


def renoise_beta_params(step: int, total: int, start: tuple[float, float] = DMDR_RENOISE_START) -> tuple[float, float]:
    """(alpha', beta') of DMDR's dynamic renoise sampling at `step`: `start` at step 0, (1, 1) from `total` on."""
    for name, value in zip(("alpha", "beta"), start):
        check_number(f"start {name}", value)
        if value <= 0:
            raise ValueError(f"Beta parameters must be > 0, got start {name} = {value!r}")
    c = cosine_decay(step, total)
    return 1.0 + (start[0] - 1.0) * c, 1.0 + (start[1] - 1.0) * c


def sample_renoise_sigma(batch: int, step: int, total: int, generator: torch.Generator | None = None,
                         start: tuple[float, float] = DMDR_RENOISE_START,
                         sigma_range: tuple[float, float] = (0.0, 1.0), device=None) -> torch.Tensor:
    """[batch] fp32 noise levels sigma = lo + (hi - lo) * u, u ~ Beta(renoise_beta_params(step, total, start)).

    sigma_range (0, 1) is DMDR's code; pass DMD2's (sigma_min, sigma_max) to make the annealed end
    point exactly DMD2's U[sigma_min, sigma_max]. torch's Beta sampler takes no generator, so the
    draw comes from a NumPy generator seeded by one draw from `generator`: the same `generator`
    state gives the same sigmas (resume-safe, like the rest of the trainer's randomness).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    lo, hi = sigma_range
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"sigma_range must satisfy 0 <= lo < hi <= 1, got {tuple(sigma_range)}")
    alpha, beta = renoise_beta_params(step, total, start)
    gen_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gen_device))
    u = np.random.default_rng(seed).beta(alpha, beta, size=batch)
    return (lo + (hi - lo) * torch.from_numpy(u)).float().to(device)


def real_lora_scale(step: int, total: int, start: float = DMDR_REAL_LORA_SCALE) -> float:
    """DMDR's dynamic distribution guidance: the LoRA scale of the real score, start at step 0, 0 from `total` on."""
    check_number("start", start, minimum=0)
    return start * cosine_decay(step, total)
