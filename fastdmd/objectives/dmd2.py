"""DMD2, the baseline (METHODS.md, "DMD2"), and the DMD loss every other method reuses.

Noise the generator's sample x0 to a level s ~ U[sigma_min, sigma_max] (or given), ask the real
score (teacher with CFG) and the fake score (critic) for their raw predictions (`dmd_predictions`),
and let the fused `ops.dmd_target` turn them into target = x0 - grad and the loss
0.5 * mean(w * (x0 - sg(target))^2) (`dmd_op`). Methods that weight samples by what the op
reports (GDMD, GNDM) run the models once and the op twice: once without grad for the statistics,
once with the weights.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from fastdmd import ops
from fastdmd.config import DMDConfig
from fastdmd.objectives.base import Batch, Objective, Update
from fastdmd.profiling import phase


class DMDInputs(NamedTuple):
    """Everything `ops.dmd_target` needs besides x0 (all without grad)."""
    x_t: torch.Tensor
    real_cond: torch.Tensor
    real_uncond: torch.Tensor | None
    fake: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    sigma: torch.Tensor


def dm_sigma(count: int, cfg: DMDConfig, generator: torch.Generator | None, device) -> torch.Tensor:
    """`count` DM noise levels ~ U[dmd.sigma_min, dmd.sigma_max]."""
    return cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * torch.rand(count, generator=generator, device=device)


def dmd_predictions(x0: torch.Tensor, labels: torch.Tensor, real, fake, cfg: DMDConfig,
                    generator: torch.Generator | None, sigma: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None) -> DMDInputs:
    """The scores at x_t = noised x0, at `sigma` ~ U[dmd.sigma_min, dmd.sigma_max] and Gaussian `noise`
    unless given."""
    adapter = real.adapter
    with torch.no_grad():
        if sigma is None:
            sigma = dm_sigma(x0.shape[0], cfg, generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = adapter.add_noise(x0.detach(), sigma, noise)
        with phase("real_score"):
            real_cond, real_uncond = real.predict(x_t, sigma, labels, cfg.guidance_scale)
        with phase("fake_score"):
            fake_pred = fake.predict(x_t, sigma, labels)
    a, b = adapter.x0_coeffs(sigma)
    return DMDInputs(x_t, real_cond, real_uncond, fake_pred, a, b, sigma)


def dmd_op(x0: torch.Tensor, inputs: DMDInputs, cfg: DMDConfig, weights: torch.Tensor | None = None) -> ops.DMDTarget:
    with phase("dmd_op"):
        return ops.dmd_target(x0, inputs.x_t, inputs.real_cond, inputs.real_uncond, inputs.fake, inputs.a, inputs.b,
                              cfg.guidance_scale, weights=weights, eps=cfg.eps)


def dmd_loss(x0: torch.Tensor, labels: torch.Tensor, real, fake, cfg: DMDConfig, generator: torch.Generator | None,
             weights: torch.Tensor | None = None, sigma: torch.Tensor | None = None) -> ops.DMDTarget:
    return dmd_op(x0, dmd_predictions(x0, labels, real, fake, cfg, generator, sigma), cfg, weights)


def dmd_logs(out: ops.DMDTarget) -> dict[str, torch.Tensor]:
    """Device tensors, read by the trainer at the end of the step (reading them here would make the
    host wait for the GPU before it can queue the backward)."""
    return {
        "loss_dmd": out.loss.detach(),
        "nonfinite_teacher_samples": (~torch.isfinite(out.normalizer)).sum(),
        "dmd_normalizer": out.normalizer.nanmean(),
        "dmd_grad_sq": out.grad_sq.mean(),
        "dmd_cosine": out.cosine.mean(),
    }


class DMD2(Objective):
    """Backward simulation to a random step k, the DMD loss on its x0, optionally DMD2's GAN term."""

    def generator_updates(self, batch: Batch) -> Iterator[Update]:
        cfg, roles = self.cfg, self.roles
        x0 = self.generate(batch)
        out = dmd_loss(x0, batch.labels, roles.real, roles.fake, cfg.dmd, batch.rng)
        loss, logs = out.loss, dmd_logs(out)
        if cfg.dmd.gan_generator_weight > 0:
            gan = roles.fake.generator_gan_loss(x0, batch.labels, batch.rng)
            loss = loss + cfg.dmd.gan_generator_weight * gan
            logs["loss_gan_generator"] = gan.detach()
        self.remember(x0, batch.labels)
        yield Update(loss, logs)
