"""DMD2, the baseline (METHODS.md, "DMD2"): the generator's distribution-matching loss.

Noise the generator's sample x0 to a random level s ~ U[sigma_min, sigma_max], ask the real score
(teacher with CFG) and the fake score (critic) for their predictions, and let the fused
`dmd_target` op turn them into target = x0 - grad and the loss 0.5 * mean((x0 - sg(target))^2).
"""

from __future__ import annotations

import torch

from fastdmd import ops
from fastdmd.config import DMDConfig
from fastdmd.profiling import phase
from fastdmd.roles import FakeScore, RealScore


def dmd_loss(x0: torch.Tensor, labels: torch.Tensor, real: RealScore, fake: FakeScore, cfg: DMDConfig,
             generator: torch.Generator | None, weights: torch.Tensor | None = None) -> ops.DMDTarget:
    adapter = real.adapter
    with torch.no_grad():
        u = torch.rand(x0.shape[0], generator=generator, device=x0.device)
        sigma = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * u
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = adapter.add_noise(x0.detach(), sigma, eps)
        with phase("real_score"):
            real_cond, real_uncond = real.predict(x_t, sigma, labels, cfg.guidance_scale)
        with phase("fake_score"):
            fake_pred = fake.predict(x_t, sigma, labels)
    a, b = adapter.x0_coeffs(sigma)
    with phase("dmd_op"):
        return ops.dmd_target(x0, x_t, real_cond, real_uncond, fake_pred, a, b, cfg.guidance_scale,
                              weights=weights, eps=cfg.eps)
