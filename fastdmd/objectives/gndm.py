"""GNDM and GNDMR (METHODS.md, "GNDM / GNDMR"; R_dm-inspired, our reading: no public code or
method section).

Distribution matching read as a reward R_dm = log p_real - log p_fake, whose gradient the DMD
update already ascends. The batch holds groups of `reward.group_size` samples of one class, and
group statistics stabilize the per-sample estimate (`gndm.normalization`):
- "group_normalizer" (a, default): DMD2's per-sample normalizer mean|x0 - x0_real| is replaced by
  its group mean, i.e. per-sample weights normalizer_i / mean_group(normalizer) on the op's grad;
- "baseline" (b): the group-mean gradient is subtracted from each sample's gradient, so only the
  sample's deviation from its group is matched;
- "norm_scale" (c): each sample's gradient is rescaled to the group-mean gradient norm;
- "none": plain DMD2 on the grouped batch (DMD2's own draws with `gndm.group_noise` false).
With `gndm.group_noise` (ours, default on) a group's samples are noised alike: one DM noise level and
one noise draw per group, so that the group statistics (the normalizer's group mean, R_dm's group
advantages) compare samples rather than the noise levels each happened to draw; with a draw per
sample, R_dm's grad_sq proxy ranked samples mostly by their noise level (Spearman 0.83 with it on a
trained digits student; two draws agreed within a group at 0.02, at 0.20 with one draw per group).

GNDMR (`gndm.pg_weight > 0`) adds a policy gradient on the fused group advantages of R_dm and
external rewards (reward.names, e.g. distribution_matching,classifier_log_prob): the batch comes
from the stochastic CPS sampler (fastdmd.rollout.sde) with fp32 log-probs, and importance sampling
reuses one rollout for `gndm.policy_updates` updates with PPO-clipped ratios p_theta / p_theta_old.
The DM loss (`gndm.dm_step`) takes the clean prediction of the deterministic last step ("last"), or,
as GNDM and DMD2 do, of the step's backward-simulation step k from the rollout's state there
("backward_sim"; R_dm's statistics for the rewards then come from one more no-grad DMD evaluation
of the final samples), so that every step of the sampler is held to the teacher's distribution.
Adaptive fusion (ours, `gndm.adaptive_fusion`): the fusion weight of reward k is its configured
weight times min(1, s_k / s̄_k), where s_k is the mean within-group std of reward k this step and
s̄_k its running average (0.9 decay); the weights are then rescaled to their configured sum. A
reward whose groups stop separating samples (saturated or converged) loses weight to the others,
which keeps the fused advantage from being dominated by the amplified noise of a flat reward. It
does not equalize the rewards' contributions (standardized within their groups, equal weights
already do that): it moves weight away from a reward that has stopped telling samples apart.
"""

from __future__ import annotations

from typing import Iterator

import torch

from fastdmd import ops
from fastdmd.objectives.base import Batch, Objective, Update
from fastdmd.objectives.dmd2 import dm_sigma, dmd_logs, dmd_op, dmd_predictions
from fastdmd.profiling import phase
from fastdmd.rollout.sde import policy_loss, sde_rollout

FUSION_EMA_DECAY = 0.9


def group_mean(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each sample's value replaced by the (NaN-ignoring) mean of its contiguous group; any [B, ...] shape."""
    grouped = values.reshape(-1, group_size, *values.shape[1:])
    return grouped.nanmean(dim=1, keepdim=True).expand_as(grouped).reshape(values.shape)


class GNDM(Objective):
    def __init__(self, cfg, roles):
        super().__init__(cfg, roles)
        self.group_size = cfg.reward.group_size
        # NaN until the first GNDMR step; a tensor from the start so that a resume loads it in place.
        self.spread_ema = torch.full((len(cfg.reward.name_list),), float("nan"))

    def dm_loss(self, x0: torch.Tensor, labels: torch.Tensor, rng) -> tuple[torch.Tensor, ops.DMDTarget]:
        """The group-normalized DMD loss and the op's per-sample statistics (unweighted)."""
        cfg, n, form = self.cfg, self.group_size, self.cfg.gndm.normalization
        inputs = self.dm_inputs(x0, labels, rng)
        if form == "none":
            out = dmd_op(x0, inputs, cfg.dmd)
            return out.loss, out
        with torch.no_grad():
            plain = dmd_op(x0.detach(), inputs, cfg.dmd)
        if form == "baseline":
            grad = x0.detach() - plain.target
            target = plain.target + group_mean(grad.float(), n).to(grad.dtype)
            return 0.5 * (x0.float() - target.float()).pow(2).mean(), plain
        if form == "group_normalizer":
            weights = plain.normalizer / group_mean(plain.normalizer, n)
        else:  # norm_scale
            norm = plain.grad_sq.sqrt()
            weights = group_mean(norm, n) / norm.clamp_min(1e-12)
        weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0)
        return dmd_op(x0, inputs, cfg.dmd, weights=weights).loss, plain

    def dm_inputs(self, x0: torch.Tensor, labels: torch.Tensor, rng: torch.Generator | None):
        """dmd_predictions, with one noise level and noise draw per group under gndm.group_noise."""
        cfg, n = self.cfg, self.group_size
        sigma = noise = None
        if cfg.gndm.group_noise:
            with torch.no_grad():
                groups = x0.shape[0] // n
                sigma = dm_sigma(groups, cfg.dmd, rng, x0.device).repeat_interleave(n)
                noise = torch.randn((groups, *x0.shape[1:]), generator=rng, device=x0.device,
                                    dtype=x0.dtype).repeat_interleave(n, dim=0)
        return dmd_predictions(x0, labels, self.roles.real, self.roles.fake, cfg.dmd, rng, sigma, noise)

    def generator_updates(self, batch: Batch) -> Iterator[Update]:
        if self.cfg.gndm.pg_weight == 0:
            x0 = self.generate(batch)
            loss, out = self.dm_loss(x0, batch.labels, batch.rng)
            self.remember(x0, batch.labels)
            yield Update(loss, dmd_logs(out))
            return
        yield from self._with_policy_gradient(batch)

    def _velocity(self, x, sigma, labels):
        gen = self.roles.generator
        return gen.adapter.predict(gen.net, x, sigma, labels)

    def _with_policy_gradient(self, batch: Batch) -> Iterator[Update]:
        cfg, c, gen = self.cfg, self.cfg.gndm, self.roles.generator
        sigmas = cfg.dmd.generator_sigmas
        with phase("rollout"):
            rollout = sde_rollout(self._velocity, batch.noise, batch.labels, sigmas, c.eta, batch.rng)
        last = len(sigmas) - 1
        k = last if c.dm_step == "last" else batch.k
        with phase("generator_fwd"):
            x0_dm = gen(rollout.trajectory[k], torch.full((batch.labels.shape[0],), sigmas[k],
                                                          device=batch.noise.device), batch.labels)
        loss_dm, out_dm = self.dm_loss(x0_dm, batch.labels, batch.rng)
        x0, out = x0_dm, out_dm
        if k != last:
            # The rewards score the final samples: R_dm's statistics of those, not of step k's x0.
            x0 = rollout.sample
            with torch.no_grad():
                out = dmd_op(x0, self.dm_inputs(x0, batch.labels, batch.rng), cfg.dmd)
        with torch.no_grad(), phase("reward"):
            scores = self.roles.reward.scores(x0.detach(), batch.labels, out)
            weights = self.fusion_weights(scores.per_reward, scores.weights)
            adv = ops.group_advantages(scores.per_reward, group_size=self.group_size, weights=weights,
                                       clip=cfg.reward.clip)
        self.remember(x0, batch.labels)
        logs = dmd_logs(out_dm) | {"reward": scores.total.mean()} | \
            {f"fusion_weight_{i}": w for i, w in enumerate(weights)}
        for update in range(c.policy_updates):
            with phase("generator_fwd"):
                pols = [policy_loss(self._velocity, rollout, i, batch.labels, adv.advantages, c.clip_range)
                        for i in rollout.stochastic]
            pg = torch.stack([p.loss.mean() for p in pols]).mean()
            loss = c.pg_weight * pg + (loss_dm if update == 0 else 0.0)
            yield Update(loss, logs | {"loss_policy": pg.detach(),
                                       "ratio_max_dev": torch.stack([(p.ratio - 1).abs().max() for p in pols]).max().detach(),
                                       "clip_frac": torch.stack([p.clip_frac.mean() for p in pols]).mean()})

    def fusion_weights(self, per_reward: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        if not self.cfg.gndm.adaptive_fusion:
            return base
        stats = ops.group_advantages(per_reward, group_size=self.group_size, weights=base, clip=self.cfg.reward.clip)
        spread = stats.group_std.mean(dim=0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(spread)
            spread /= torch.distributed.get_world_size()
        ema = self.spread_ema.to(spread.device)  # made, and loaded from checkpoints, on the CPU
        # The first spread seen starts the average (NaN until then): chosen on the device, no wait for the GPU.
        self.spread_ema = torch.where(torch.isnan(ema).all(), spread, ema)
        weights = base * (spread / self.spread_ema.clamp_min(1e-12)).clamp(max=1.0)
        weights = weights * base.sum() / weights.sum().clamp_min(1e-12)
        self.spread_ema.mul_(FUSION_EMA_DECAY).add_((1 - FUSION_EMA_DECAY) * spread)
        return weights

    def state_dict(self) -> dict:
        return {"spread_ema": self.spread_ema}

    def load_state_dict(self, state: dict) -> None:
        self.spread_ema = state["spread_ema"].clone()
