"""What a method plugs into the training loop.

The trainer owns the roles, optimizers, schedules, checkpoints and the step's randomness; a method
(one module per method in fastdmd/objectives) says what one generator step computes with them:

    for update in objective.generator_updates(batch):   # usually one; importance sampling: several
        update.loss.backward(); optimizer step (skipped when non-finite); EMA
    for _ in range(trainer.critic_updates):              # when objective.uses_critic
        objective.critic_loss(rng).backward(); critic optimizer step

`Batch` carries the step's labels (in groups of `objective.group_size` equal labels for the group
methods), noise, backward-simulation step k and the step's random generator. A method keeps what
its critic trains on (`remember`) and any state that must survive a resume (`state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn as nn

from fastdmd.config import Config
from fastdmd.profiling import phase
from fastdmd.rewards import CombinedReward


@dataclass
class Roles:
    generator: nn.Module                 # fastdmd.roles.Generator (trainable)
    real: object                         # fastdmd.roles.RealScore (frozen teacher with CFG)
    fake: nn.Module | None               # fastdmd.roles.FakeScore (trainable critic), None without a critic
    reward: CombinedReward | None        # the configured rewards (reward methods)
    classifier: nn.Module                # frozen digits classifier (features for DrPO)
    base: nn.Module | None               # frozen copy of the generator at the start (DrPO's base drift)
    real_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # real digits (GAN term)
    rollout: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (noise, labels, k, rng) -> (x_{s_k}, s_k), no grad


class Batch(NamedTuple):
    step: int                  # the generator step being taken, from 1
    labels: torch.Tensor       # [B] class labels (contiguous groups of group_size equal labels)
    noise: torch.Tensor        # [B, C, H, W] the sampler's starting noise
    k: int                     # backward-simulation step that receives gradient (same on every rank)
    rng: torch.Generator       # the step's random stream (resume-safe: drawn from (seed, rank, step))


class Update(NamedTuple):
    loss: torch.Tensor         # scalar generator loss of one optimizer update
    logs: dict                 # name -> float or one-element tensor (read at the step's end); means over a
                               # step's updates are logged


class Objective:
    """Base: DMD2-style generation by backward simulation and the critic's denoising loss."""

    uses_critic = True
    group_size = 1

    def __init__(self, cfg: Config, roles: Roles):
        self.cfg, self.roles = cfg, roles
        self.samples: torch.Tensor | None = None
        self.sample_labels: torch.Tensor | None = None

    def generate(self, batch: Batch) -> torch.Tensor:
        """x0 of the few-step sampler with gradient through step k only (DMD2's backward simulation)."""
        gen = self.roles.generator
        with phase("rollout"):
            x_t, sigma = self.roles.rollout(batch.noise, batch.labels, batch.k, batch.rng)
        with phase("generator_fwd"):
            return gen(x_t, sigma, batch.labels)

    def remember(self, x0: torch.Tensor, labels: torch.Tensor) -> None:
        """The generator samples the critic trains on after this step."""
        self.samples, self.sample_labels = x0.detach(), labels

    def generator_updates(self, batch: Batch) -> Iterator[Update]:
        raise NotImplementedError

    def critic_sigma(self, step: int, rng: torch.Generator) -> torch.Tensor | None:
        """Noise levels of the critic's denoising loss (None: U(0, 1))."""
        return None

    def critic_loss(self, step: int, rng: torch.Generator) -> tuple[torch.Tensor, dict]:
        fake, d = self.roles.fake, self.cfg.dmd
        real_x0, real_labels = self.roles.real_batch(rng) if fake.gan_head is not None else (None, None)
        return fake.critic_loss(self.samples, self.sample_labels, real_x0, real_labels, d.gan_critic_weight, rng,
                                sigma=self.critic_sigma(step, rng))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
