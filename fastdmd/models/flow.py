"""The rectified-flow parametrization every family shares (digits UNet, SD3, FLUX).

Flow convention (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1 - s) x0 + s eps, the model
predicts the velocity v = eps - x0 at timestep 1000 * s, so x0_pred = x_t - s * v (a = 1, b = -s).
A family's adapter says only how a network is called on (x_t, s, condition index): conditions are
integer indices (a digit class, or a prompt of the run's prompt list); index `null_index` is the
unconditional input of classifier-free guidance (the null class, or the empty prompt).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FlowAdapter:
    num_train_timesteps = 1000
    null_index: int

    def add_noise(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * eps

    def x0_coeffs(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (a, b) with x0_pred = a * x_t + b * pred."""
        return torch.ones_like(sigma), -sigma

    def to_x0(self, x_t: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        a, b = self.x0_coeffs(sigma)
        shape = (-1, *([1] * (x_t.dim() - 1)))
        return a.view(shape) * x_t + b.view(shape) * pred

    def target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict (the velocity)."""
        return eps - x0

    def predict(self, model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_cfg(self, model, x_t, sigma, labels, guidance_scale: float) -> torch.Tensor:
        """pred_cfg = uncond + g * (cond - uncond); g = 1 skips the unconditional forward."""
        if guidance_scale == 1.0:
            return self.predict(model, x_t, sigma, labels)
        cond, uncond = self.predict_cond_uncond(model, x_t, sigma, labels)
        return uncond + guidance_scale * (cond - uncond)

    def predict_cond_uncond(self, model, x_t, sigma, labels, batched: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional predictions, batched as one forward (or as two forwards)."""
        null = torch.full_like(labels, self.null_index)
        if not batched:
            return self.predict(model, x_t, sigma, labels), self.predict(model, x_t, sigma, null)
        out = self.predict(model, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        return out.chunk(2)
