"""RTDMD, reward-tilted distribution matching (METHODS.md, "RTDMD", following its public code).

Target p_tilde ~ p_teacher * exp(beta r); two stages switched by `rtdmd.stage1_steps`.

Stage 1, AC-DMD: the generator runs its few-step schedule as CPS steps (eta) and stops after k + 1
steps (k: the step's shared backward-simulation draw); x_s is its actual state at the sigma s
after that step (s = 0 after the last step), the last step taken with grad. x_s is renoised to
t ~ U[max(s + 0.01, 0.02), 0.98] (our reading of "U[ts + 10, 1000] clamped to [20, 980]": the range is
clamped, not each draw, so no draws pile up at 0.98): x_t = a x_s + sigma_ts eps, a = (1 - t)/(1 - s),
sigma_ts = sqrt(t^2 - a^2 s^2). Teacher (CFG) and critic each take one CPS step from t back to s
with shared noise xi; that step is affine in the velocity, x_s_pred = A x_t + B v + C xi, so the
fused `ops.dmd_target` (with its noise/c term) gives grad = (xs_fake - xs_real) / mean|x_s -
xs_real| and loss = 0.5 mse(x_s, sg(x_s - grad)). At s = 0 this is DMD2's loss.
The critic regresses v* = -x_s/(1 - s) + ((t + (1 - t) s^2/(1 - s)^2) / sigma_ts) eps at x_t with
weight min(1, 10 sigma_ts^2), plus `consistency_weight` x the consistency regularizer: with
h(x, t) = x - t v_fake(x, t), two independent CPS steps (detached) from t to t' = t - Delta give
x'_1, x'_2 and L_cons = mean((h(x'_1, t') - h(x_t, t)) (h(x'_2, t') - h(x_t, t))).

Stage 2, hybrid policy gradient: groups of `reward.group_size` samples per class from the CPS SDE
sampler with fp32 log-probs; group advantages (ops.group_advantages, clipped) of the weighted sum of
the rewards (summed first, then standardized, as flow-GRPO's code does); PPO
clipped loss on the SubGRPO-trained stochastic steps (the untrained ones use noise shared within a
group, seeded from the class, the step and the run seed); the deterministic last step gets AC-DMD
(`last_step_dmd_weight`) plus reward backprop `reward_backprop_weight * mean(relu(margin - sum_k
w_k r_k(x0)))`. The critic keeps training on the rollouts' samples (s = 0). The critic is the full
network, as in DMD2 (ours: the public code trains a rank-32 LoRA of it at lr 3e-5).
With `trainer.critic_samples = "fresh_last"` (ours) the critic trains on fresh full 4-step samples
(s = 0) in both stages: AC-DMD's critic is conditioned on t only, and for t > s the renoised x_s of
a self-consistent generator has the same marginal as its renoised final samples.
Evaluation samples with the DMD2 sampler (eta = 1); training uses eta (0.9), whose extra
deterministic share is cos(0.45 pi) = 0.16 of the noise term.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from fastdmd import ops
from fastdmd.objectives.base import Batch, Objective, Update
from fastdmd.objectives.dmd2 import dmd_logs
from fastdmd.profiling import phase
from fastdmd.rollout.sde import cps_step, group_shared_noise, policy_loss, sde_rollout, subgrpo_steps

T_MIN, T_MAX, T_GAP = 0.02, 0.98, 0.01   # RTDMD's min/max step 20/980 and the +10 timesteps above s


def cps_back_coeffs(t: torch.Tensor, s: float, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, C) [B] with CPS step(x_t, v, t -> s, eta, xi) = A x_t + B v + C xi: the step is affine in
    the velocity, which is what lets `ops.dmd_target` (x0_pred = a x_t + b pred + c noise) run it."""
    keep = math.cos(eta * math.pi / 2)
    a = torch.full_like(t, (1 - s) + s * keep)
    b = -(1 - s) * t + s * keep * (1 - t)
    c = torch.full_like(t, s * math.sin(eta * math.pi / 2))
    return a, b, c


class RTDMD(Objective):
    def __init__(self, cfg, roles):
        super().__init__(cfg, roles)
        self.group_size = cfg.reward.group_size
        self.sample_sigma = 0.0
        if cfg.rtdmd.reward_backprop_weight > 0:
            roles.reward.require_differentiable("RTDMD's reward backprop through the last step")

    # ----- shared pieces -------------------------------------------------------------------------
    def _velocity(self, x, sigma, labels):
        gen = self.roles.generator
        return gen.adapter.predict(gen.net, x, sigma, labels)

    def _renoise(self, x_s: torch.Tensor, s: float, rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, sigma_ts, eps): x_s at sigma s renoised to t ~ U[max(s + 0.01, 0.02), 0.98]."""
        batch, dev = x_s.shape[0], x_s.device
        lo = max(s + T_GAP, T_MIN)
        t = lo + (T_MAX - lo) * torch.rand(batch, generator=rng, device=dev)
        a = (1 - t) / (1 - s)
        sigma_ts = (t**2 - a**2 * s**2).sqrt()
        eps = torch.randn(x_s.shape, generator=rng, device=dev, dtype=x_s.dtype)
        shape = (batch,) + (1,) * (x_s.dim() - 1)
        return a.view(shape) * x_s.detach() + sigma_ts.view(shape) * eps, t, sigma_ts, eps

    def ac_dmd(self, x_s: torch.Tensor, s: float, labels: torch.Tensor, rng) -> ops.DMDTarget:
        """AC-DMD loss at the generator state x_s (sigma s); differentiable w.r.t. x_s."""
        cfg, roles, eta = self.cfg, self.roles, self.cfg.rtdmd.eta
        with torch.no_grad():
            x_t, t, _, _ = self._renoise(x_s, s, rng)
            xi = torch.randn(x_s.shape, generator=rng, device=x_s.device, dtype=x_s.dtype)
            with phase("real_score"):
                real_cond, real_uncond = roles.real.predict(x_t, t, labels, cfg.dmd.guidance_scale)
            with phase("fake_score"):
                fake = roles.fake.predict(x_t, t, labels)
        a, b, c = cps_back_coeffs(t, s, eta)
        with phase("dmd_op"):
            return ops.dmd_target(x_s, x_t, real_cond, real_uncond, fake, a, b, cfg.dmd.guidance_scale,
                                  noise=xi, c=c, eps=cfg.dmd.eps)

    def generator_updates(self, batch: Batch) -> Iterator[Update]:
        if batch.step <= self.cfg.rtdmd.stage1_steps:
            yield self._stage1(batch)
        else:
            yield self._stage2(batch)

    # ----- stage 1: AC-DMD -----------------------------------------------------------------------
    def _stage1(self, batch: Batch) -> Update:
        sigmas, eta = self.cfg.dmd.generator_sigmas, self.cfg.rtdmd.eta
        levels = list(sigmas) + [0.0]
        x = batch.noise
        full = lambda s: torch.full((x.shape[0],), s, device=x.device)  # noqa: E731
        with torch.no_grad(), phase("rollout"):
            for i in range(batch.k):
                xi = torch.randn(x.shape, generator=batch.rng, device=x.device, dtype=x.dtype)
                x = cps_step(x, self._velocity(x, full(levels[i]), batch.labels), levels[i], levels[i + 1], eta, xi).x_next
        with phase("generator_fwd"):
            s = levels[batch.k + 1]
            xi = torch.randn(x.shape, generator=batch.rng, device=x.device, dtype=x.dtype)
            x_s = cps_step(x, self._velocity(x, full(levels[batch.k]), batch.labels), levels[batch.k], s, eta, xi).x_next
        out = self.ac_dmd(x_s, s, batch.labels, batch.rng)
        self.samples, self.sample_labels, self.sample_sigma = x_s.detach(), batch.labels, s
        return Update(out.loss, dmd_logs(out) | {"stage": 1.0, "ac_sigma": s})

    # ----- stage 2: hybrid policy gradient ----------------------------------------------------
    def _stage2(self, batch: Batch) -> Update:
        cfg, c, gen, n = self.cfg, self.cfg.rtdmd, self.roles.generator, self.group_size
        sigmas = cfg.dmd.generator_sigmas
        num_stochastic = len(sigmas) - 1
        trained = subgrpo_steps(num_stochastic, min(c.subgrpo_trained, num_stochastic), batch.step, cfg.trainer.seed)
        untrained = [i for i in range(num_stochastic) if i not in trained]
        group_seeds = [cfg.trainer.seed * 100 + int(y) for y in batch.labels[::n]]
        shared = group_shared_noise(untrained, group_seeds, n, batch.noise.shape[1:], batch.step,
                                    device=batch.noise.device)
        with phase("rollout"):
            rollout = sde_rollout(self._velocity, batch.noise, batch.labels, sigmas, c.eta, batch.rng,
                                  shared_noise=shared)
        with torch.no_grad(), phase("reward"):
            scores = self.roles.reward.scores(rollout.sample, batch.labels)
            # The weighted sum of the rewards, then its group statistics: RTDMD's (flow-GRPO's) order.
            adv = ops.group_advantages(scores.total[:, None], group_size=n, clip=cfg.reward.clip)
        with phase("generator_fwd"):
            pols = [policy_loss(self._velocity, rollout, i, batch.labels, adv.advantages, c.clip_range) for i in trained]
        pg = torch.stack([p.loss.mean() for p in pols]).mean()
        last = len(sigmas) - 1
        with phase("generator_fwd"):
            x0 = gen(rollout.trajectory[last], torch.full((batch.noise.shape[0],), sigmas[last],
                                                          device=batch.noise.device), batch.labels)
        out = self.ac_dmd(x0, 0.0, batch.labels, batch.rng)
        loss = pg + c.last_step_dmd_weight * out.loss
        logs = dmd_logs(out) | {"stage": 2.0, "loss_policy": pg.detach(), "reward": scores.total.mean()}
        if c.reward_backprop_weight > 0:
            with phase("reward"):
                backprop = F.relu(c.reward_margin - self.roles.reward(x0, batch.labels)).mean()
            loss = loss + c.reward_backprop_weight * backprop
            logs["loss_reward_backprop"] = backprop.detach()
        self.samples, self.sample_labels, self.sample_sigma = x0.detach(), batch.labels, 0.0
        return Update(loss, logs)

    # ----- critic ----------------------------------------------------------------------------------
    def remember(self, x0: torch.Tensor, labels: torch.Tensor) -> None:
        """trainer.critic_samples fresh_last: the critic trains on full few-step samples (s = 0)."""
        super().remember(x0, labels)
        self.sample_sigma = 0.0

    def critic_loss(self, step: int, rng) -> tuple[torch.Tensor, dict]:
        fake, s, x_s, labels = self.roles.fake, self.sample_sigma, self.samples, self.sample_labels
        x_t, t, sigma_ts, eps = self._renoise(x_s, s, rng)
        shape = (x_s.shape[0],) + (1,) * (x_s.dim() - 1)
        coef = ((t + (1 - t) * s**2 / (1 - s) ** 2) / sigma_ts).view(shape)
        v_star = -x_s / (1 - s) + coef * eps
        weight = (10 * sigma_ts**2).clamp(max=1.0)
        pred = fake.predict(x_t, t, labels)
        denoise = (weight * (pred - v_star).pow(2).flatten(1).mean(1)).mean()
        logs = {"loss_critic": denoise.detach()}
        loss = denoise
        w = self.cfg.rtdmd.consistency_weight
        if w > 0:
            cons = self._consistency(x_t, t, pred, labels, rng)
            loss = loss + w * cons
            logs["loss_consistency"] = cons.detach()
        return loss, logs

    def _consistency(self, x_t, t, pred_t, labels, rng) -> torch.Tensor:
        fake, eta = self.roles.fake, self.cfg.rtdmd.eta
        shape = (x_t.shape[0],) + (1,) * (x_t.dim() - 1)
        max_steps = max(1, round(self.cfg.rtdmd.consistency_max_delta * 1000))  # Delta ~ U{1..max} timesteps
        delta = torch.randint(1, max_steps + 1, (x_t.shape[0],), generator=rng, device=x_t.device) / 1000
        t_next = (t - delta).clamp_min(1e-3)
        h_t = x_t - t.view(shape) * pred_t
        ends = []
        with torch.no_grad():
            for _ in range(2):
                xi = torch.randn(x_t.shape, generator=rng, device=x_t.device, dtype=x_t.dtype)
                ends.append(cps_step(x_t, pred_t.detach(), t, t_next, eta, xi).x_next.to(x_t.dtype))
        h = [x - t_next.view(shape) * fake.predict(x, t_next, labels) for x in ends]
        return ((h[0] - h_t) * (h[1] - h_t)).mean()
