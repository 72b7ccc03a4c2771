"""GDMD-like (METHODS.md, "GDMD"; our reading: the paper's method section and code are not public).

The DMD gradient read as an implicit target: for each sample, K targets T_k = sg(x0) - grad_k at K
noise levels; the rewards score the targets (not the raw sample); the K targets of a sample form
one group, whose standardized, clipped advantages A_k (`target_advantages`, METHODS.md's formula)
become per-target weights w(A_k) (`gdmd.weight_mode`, fastdmd.objectives.weights):

    loss = (1/K) sum_k 0.5 * mean(w(A_k) * (x0 - T_k)^2)

so a sample is pulled harder toward the targets the reward prefers. The models run once per
target; the op runs twice per target: without grad to build T_k, then with the weights.
"""

from __future__ import annotations

from typing import Iterator

import torch

from fastdmd.objectives.base import Batch, Objective, Update
from fastdmd.objectives.dmd2 import dmd_logs, dmd_op, dmd_predictions
from fastdmd.objectives.weights import gdmd_weights
from fastdmd.profiling import phase


def target_advantages(scores: torch.Tensor, weights: torch.Tensor, eps: float, clip: float) -> torch.Tensor:
    """A [B, K] from the rewards [B, K, R] of each sample's K targets: METHODS.md's
    A_k = clip((r_k - mean_k r) / (std_k r + eps), -c, c) (population std over the K targets), each
    reward standardized so, then summed with the reward weights before the clip (one reward of weight
    1: exactly that formula). Not ops.group_advantages, which standardizes the fused sum again: with one
    reward that divides by std / (std + eps) and undoes the eps, so rewards nearly equal over the
    targets (say classifier log-probs 1e-6 apart) would get full-strength weights; here A shrinks
    smoothly to 0 as the spread falls below eps."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, unbiased=False, keepdim=True)
    return (((scores - mean) / (std + eps)) * weights).sum(dim=-1).clamp(-clip, clip)


class GDMD(Objective):
    def generator_updates(self, batch: Batch) -> Iterator[Update]:
        cfg, c, roles = self.cfg, self.cfg.gdmd, self.roles
        x0 = self.generate(batch)
        inputs = [dmd_predictions(x0, batch.labels, roles.real, roles.fake, cfg.dmd, batch.rng) for _ in range(c.num_targets)]
        with torch.no_grad(), phase("reward"):
            plain = [dmd_op(x0.detach(), inp, cfg.dmd) for inp in inputs]
            scored = [roles.reward.scores(out.target, batch.labels, out) for out in plain]
            scores = torch.stack([s.per_reward for s in scored], dim=1)
            advantages = target_advantages(scores, scored[0].weights, c.eps, cfg.reward.clip)
            weights = gdmd_weights(advantages, c.weight_mode, c.lam, c.tau)
        outs = [dmd_op(x0, inp, cfg.dmd, weights=weights[:, i].contiguous()) for i, inp in enumerate(inputs)]
        loss = torch.stack([o.loss for o in outs]).mean()
        self.remember(x0, batch.labels)
        plain_logs = [dmd_logs(o) for o in plain]
        logs = {key: torch.stack([row[key].double() for row in plain_logs]).mean() for key in plain_logs[0]}
        yield Update(loss, logs | {"reward_targets": torch.stack([s.total for s in scored]).mean(), "gdmd_weight_max": weights.max(),
                                   "gdmd_weight_min": weights.min()})
