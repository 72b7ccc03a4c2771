"""DMDR (METHODS.md, "DMDR", following its public code): the DMD loss as the regularizer of reward
backprop, with dynamic distribution guidance and dynamic renoise sampling.

    loss = dm_weight * L_DMD + reward_weight * (-log p_classifier(label | x0))   (reward after cold_start)

- Reward: the digits classifier's cross-entropy on the requested label, differentiated through the
  generator's x0 (DMDR ImageNet: 0.05 x the cross-entropy of a classifier, after a cold start).
- Dynamic renoise sampling (`dmdr.renoise`): the DM noise level of the DMD loss and of the
  critic's denoising loss is drawn from Beta(4, 1.5) annealed to uniform over `renoise_steps`
  (fastdmd.objectives.schedules), mapped onto [sigma_min, sigma_max] for the DMD loss.
- Dynamic distribution guidance (`dmdr.distribution_guidance`): the critic is the frozen teacher
  plus a LoRA (peft), used at `fake_lora_scale` as the fake score; the real score is the teacher
  plus the same LoRA at `real_lora_scale`, cosine-decayed to 0 over `guidance_steps`, so early on
  the real distribution sits nearer the fake one.
"""

from __future__ import annotations

from typing import Iterator

import torch

from fastdmd.objectives.base import Batch, Objective, Update
from fastdmd.objectives.dmd2 import dmd_logs, dmd_loss
from fastdmd.objectives.schedules import real_lora_scale, sample_renoise_sigma
from fastdmd.profiling import phase
from fastdmd.roles import LoraRealScore


class DMDR(Objective):
    def __init__(self, cfg, roles):
        super().__init__(cfg, roles)
        roles.reward.require_differentiable("DMDR's reward loss")

    def real_score(self, step: int):
        c = self.cfg.dmdr
        if not c.distribution_guidance:
            return self.roles.real
        return LoraRealScore(self.roles.fake.net, self.roles.real.adapter,
                             real_lora_scale(step - 1, c.guidance_steps, c.real_lora_scale))

    def renoise_sigma(self, step: int, batch_size: int, rng: torch.Generator, lo: float, hi: float):
        c = self.cfg.dmdr
        if not c.renoise:
            return None
        return sample_renoise_sigma(batch_size, step - 1, c.renoise_steps, rng, sigma_range=(lo, hi))

    def generator_updates(self, batch: Batch) -> Iterator[Update]:
        cfg, c = self.cfg, self.cfg.dmdr
        x0 = self.generate(batch)
        sigma = self.renoise_sigma(batch.step, x0.shape[0], batch.rng, cfg.dmd.sigma_min, cfg.dmd.sigma_max)
        out = dmd_loss(x0, batch.labels, self.real_score(batch.step), self.roles.fake, cfg.dmd, batch.rng,
                       sigma=None if sigma is None else sigma.to(x0.device))
        loss, logs = c.dm_weight * out.loss, dmd_logs(out)
        with phase("reward"):
            reward = self.roles.reward(x0, batch.labels)
        if batch.step > c.cold_start:
            loss = loss - c.reward_weight * reward.mean()
        self.remember(x0, batch.labels)
        yield Update(loss, logs | {"reward": reward.mean().detach(), "reward_on": float(batch.step > c.cold_start)})

    def critic_sigma(self, step: int, rng: torch.Generator):
        sigma = self.renoise_sigma(step, self.samples.shape[0], rng, 0.0, 1.0)
        return None if sigma is None else sigma.to(self.samples.device)
