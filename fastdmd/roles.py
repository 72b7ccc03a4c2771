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

from fastdmd.models.flow import FlowAdapter
from fastdmd.models.lora import add_lora, lora_scale
from fastdmd.rollout.graphs import CudaGraphs


class Generator(nn.Module):
    def __init__(self, net: nn.Module, adapter: FlowAdapter):
        super().__init__()
        self.net, self.adapter = net, adapter

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.adapter.to_x0(x_t, sigma, self.adapter.predict(self.net, x_t, sigma, labels))


class RealScore:
    graphs: CudaGraphs | None = None  # the trainer's, with perf.cuda_graph_scores: predict replays CUDA graphs
    batched_cfg = True                # perf.batched_cfg: cond and uncond in one forward (False: two)

    def __init__(self, net: nn.Module, adapter: FlowAdapter):
        self.net, self.adapter = net.eval().requires_grad_(False), adapter

    @torch.no_grad()
    def predict(self, x_t, sigma, labels, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) raw predictions; uncond is None when guidance_scale == 1."""
        if self.graphs is not None:
            return self.graphs(x_t, sigma, labels, constants=(guidance_scale,))
        return self.eager_predict(x_t, sigma, labels, guidance_scale)

    def eager_predict(self, x_t, sigma, labels, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if guidance_scale == 1.0:
            return self.adapter.predict(self.net, x_t, sigma, labels), None
        return self.adapter.predict_cond_uncond(self.net, x_t, sigma, labels, batched=self.batched_cfg)

    @torch.no_grad()
    def velocity(self, x_t, sigma, labels, guidance_scale: float) -> torch.Tensor:
        return self.adapter.predict_cfg(self.net, x_t, sigma, labels, guidance_scale)


class GanHead(nn.Module):
    """DMD2's discriminator head: real-vs-generated logit from the critic's bottleneck features."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features).mean(dim=(1, 2, 3))


class LoraRealScore(RealScore):
    """DMDR's real score: the teacher plus the critic's LoRA at a scale that decays over training
    (the critic's network is the frozen teacher with a LoRA, so scale 0 is the teacher itself)."""

    def __init__(self, critic_net: nn.Module, adapter: FlowAdapter, scale: float):
        self.net, self.adapter, self.scale = critic_net, adapter, scale

    @torch.no_grad()
    def predict(self, x_t, sigma, labels, guidance_scale: float):
        with lora_scale(self.net, self.scale):
            return super().predict(x_t, sigma, labels, guidance_scale)


class FakeScore(nn.Module):
    """The critic; with `gan=True` it also carries DMD2's GAN head on its mid-block features, so one
    forward gives both the denoising prediction and a real-vs-generated logit. With `lora_rank` the
    critic is the frozen teacher plus a trainable LoRA used at `lora_multiplier` (DMDR)."""

    def __init__(self, net: nn.Module, adapter: FlowAdapter, gan: bool = False, lora_rank: int = 0,
                 lora_multiplier: float = 1.0):
        super().__init__()
        if lora_rank:
            add_lora(net, lora_rank)
        self.net, self.adapter = net, adapter
        self.lora_multiplier = lora_multiplier if lora_rank else None
        self.gan_head = GanHead(net.mid_block.resnets[-1].out_channels) if gan else None
        self.graphs: CudaGraphs | None = None  # the trainer's, with perf.cuda_graph_scores: no-grad predict only
        self._mid_features = None
        if gan:
            net.mid_block.register_forward_hook(self._keep_mid_features)

    def _keep_mid_features(self, module, inputs, output) -> None:
        self._mid_features = output

    def predict(self, x_t, sigma, labels) -> torch.Tensor:
        if self.graphs is not None and not torch.is_grad_enabled():
            return self.graphs(x_t, sigma, labels)
        return self.eager_predict(x_t, sigma, labels)

    def eager_predict(self, x_t, sigma, labels) -> torch.Tensor:
        if self.lora_multiplier is None:
            return self.adapter.predict(self.net, x_t, sigma, labels)
        with lora_scale(self.net, self.lora_multiplier):
            return self.adapter.predict(self.net, x_t, sigma, labels)

    def predict_and_logit(self, x_t, sigma, labels) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.predict(x_t, sigma, labels)
        return pred, self.gan_head(self._mid_features)

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None,
               sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, sigma, eps) with sigma ~ U(0, 1) unless given."""
        if sigma is None:
            sigma = torch.rand(x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.adapter.add_noise(x0, sigma, eps), sigma, eps

    def denoising_loss(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None,
                       sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's own training loss, on detached generator samples at sigma ~ U(0, 1) unless given."""
        x0 = x0.detach()
        x_t, sigma, eps = self.noised(x0, generator, sigma)
        return F.mse_loss(self.predict(x_t, sigma, labels), self.adapter.target(x0, eps))

    def critic_loss(self, x0, labels, real_x0, real_labels, gan_weight: float, generator,
                    sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Denoising loss, plus (with the GAN head) gan_weight x the non-saturating discriminator loss:
        softplus(-D(noised real)) + softplus(D(noised generated)), both batches noised at the same levels
        (`sigma`, or U(0, 1) draws; the real batch is as large as the generated one)."""
        if self.gan_head is None or gan_weight == 0:
            loss = self.denoising_loss(x0, labels, generator, sigma)
            return loss, {"loss_critic": loss.detach()}
        x0 = x0.detach()
        x_t, sigma, eps = self.noised(x0, generator, sigma)
        pred, logit_fake = self.predict_and_logit(x_t, sigma, labels)
        denoise = F.mse_loss(pred, self.adapter.target(x0, eps))
        # The real batch at the generated batch's noise levels: the discriminator learns nothing from the
        # noise level (DMDR's renoise levels differ from U(0, 1)).
        real_t, real_sigma, _ = self.noised(real_x0, generator, sigma)
        _, logit_real = self.predict_and_logit(real_t, real_sigma, real_labels)
        disc = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
        return denoise + gan_weight * disc, {"loss_critic": denoise.detach(), "loss_discriminator": disc.detach()}

    def generator_gan_loss(self, x0: torch.Tensor, labels: torch.Tensor, generator) -> torch.Tensor:
        """softplus(-D(noised x0)): differentiable w.r.t. x0 through the critic."""
        x_t, sigma, _ = self.noised(x0, generator)
        return F.softplus(-self.predict_and_logit(x_t, sigma, labels)[1]).mean()


def build_roles(teacher: nn.Module, adapter: FlowAdapter, gan: bool = False, critic: bool = True,
                lora_rank: int = 0, lora_multiplier: float = 1.0) -> tuple[Generator, RealScore, FakeScore | None]:
    """Generator and critic both start as fp32 copies of the teacher (no critic when `critic` is False)."""
    generator = Generator(copy.deepcopy(teacher).float().train().requires_grad_(True), adapter)
    fake = FakeScore(copy.deepcopy(teacher).float().train().requires_grad_(True), adapter, gan=gan, lora_rank=lora_rank,
                     lora_multiplier=lora_multiplier) if critic else None
    return generator, RealScore(teacher, adapter), fake
