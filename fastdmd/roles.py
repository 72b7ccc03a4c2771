"""The three roles of distribution matching and the weights each owns.

- Generator: the few-step student (trainable), initialised from the teacher; maps (x_t, s, label)
  to a clean sample.
- RealScore: the frozen teacher with classifier-free guidance; gives raw predictions, cond and
  uncond batched as one forward.
- FakeScore: the critic (trainable), initialised from the teacher, trained by denoising on the
  generator's detached samples so that it tracks the generator's distribution.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdmd.models.digits import DigitsFlowAdapter


class Generator(nn.Module):
    def __init__(self, net: nn.Module, adapter: DigitsFlowAdapter):
        super().__init__()
        self.net, self.adapter = net, adapter

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.adapter.to_x0(x_t, sigma, self.adapter.predict(self.net, x_t, sigma, labels))


class RealScore:
    def __init__(self, net: nn.Module, adapter: DigitsFlowAdapter):
        self.net, self.adapter = net.eval().requires_grad_(False), adapter

    @torch.no_grad()
    def predict(self, x_t, sigma, labels, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) raw predictions; uncond is None when guidance_scale == 1."""
        if guidance_scale == 1.0:
            return self.adapter.predict(self.net, x_t, sigma, labels), None
        return self.adapter.predict_cond_uncond(self.net, x_t, sigma, labels)

    @torch.no_grad()
    def velocity(self, x_t, sigma, labels, guidance_scale: float) -> torch.Tensor:
        return self.adapter.predict_cfg(self.net, x_t, sigma, labels, guidance_scale)


class FakeScore(nn.Module):
    def __init__(self, net: nn.Module, adapter: DigitsFlowAdapter):
        super().__init__()
        self.net, self.adapter = net, adapter

    def predict(self, x_t, sigma, labels) -> torch.Tensor:
        return self.adapter.predict(self.net, x_t, sigma, labels)

    def denoising_loss(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The teacher's own training loss, on detached generator samples at sigma ~ U(0, 1)."""
        x0 = x0.detach()
        sigma = torch.rand(x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        pred = self.predict(self.adapter.add_noise(x0, sigma, eps), sigma, labels)
        return F.mse_loss(pred, self.adapter.target(x0, eps))


def build_roles(teacher: nn.Module, adapter: DigitsFlowAdapter) -> tuple[Generator, RealScore, FakeScore]:
    """Generator and critic both start as copies of the teacher."""
    generator = Generator(copy.deepcopy(teacher).train().requires_grad_(True), adapter)
    fake = FakeScore(copy.deepcopy(teacher).train().requires_grad_(True), adapter)
    return generator, RealScore(teacher, adapter), fake
