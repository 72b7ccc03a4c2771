"""DrPO (METHODS.md, "DrPO", following its public code): ranked-sample dipole updates plus a
base-model drift, with no reward gradient and no critic.

Per group (reward.group_size samples of one class): the rewards only rank the samples; the top
`num_ranked` are positives, the bottom `num_ranked` negatives. In a frozen feature space
(`drpo.features`: the digits classifier's pooled conv features, or the pixels):
    L_pref = drift_loss(f(x0), positives, negatives, w_pos = w_neg = pos_weight)
    L_ref  = drift_loss(f(x0), positives = f(base generator's x0 from the same input), negatives = f(x0),
                        self-masked)
    loss   = mean over groups of L_pref + ref_weight * L_ref
(fastdmd.objectives.drift). DrPO starts from a distilled generator: `model.init_generator` names a
DMD2 run (or export), whose weights are also the frozen base. The generator samples with the same
backward simulation as DMD2 (gradient through one random step k); the base model predicts from the
same state x_k, which is "the same noise" for the step that learns.
"""

from __future__ import annotations

from typing import Iterator

import torch

from fastdmd.objectives.base import Batch, Objective, Update
from fastdmd.objectives.drift import drift_loss
from fastdmd.profiling import phase


class DrPO(Objective):
    uses_critic = False

    def __init__(self, cfg, roles):
        super().__init__(cfg, roles)
        self.group_size = cfg.reward.group_size
        if 2 * cfg.drpo.num_ranked > self.group_size:
            raise ValueError(f"drpo.num_ranked = {cfg.drpo.num_ranked} positives plus as many negatives do not fit in "
                             f"a group of reward.group_size = {self.group_size}; use num_ranked <= {self.group_size // 2}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.drpo.features == "pixels":
            return images.flatten(1).float()
        return self.roles.classifier.fd_features(images).float()

    def generator_updates(self, batch: Batch) -> Iterator[Update]:
        cfg, c, roles, n = self.cfg, self.cfg.drpo, self.roles, self.group_size
        with phase("rollout"):
            x_t, sigma = roles.rollout(batch.noise, batch.labels, batch.k, batch.rng)
            with torch.no_grad():
                base_x0 = roles.base(x_t, sigma, batch.labels)
        with phase("generator_fwd"):
            x0 = roles.generator(x_t, sigma, batch.labels)
        with torch.no_grad(), phase("reward"):
            reward = roles.reward(x0.detach(), batch.labels)
            base_feats = self.features(base_x0)
        feats = self.features(x0)
        losses_pref, losses_ref = [], []
        with phase("reward"):
            for g in range(x0.shape[0] // n):
                rows = slice(g * n, (g + 1) * n)
                order = torch.argsort(reward[rows], descending=True)
                f = feats[rows]
                pos, neg = f[order[:c.num_ranked]].detach(), f[order[-c.num_ranked:]].detach()
                losses_pref.append(drift_loss(f, pos, neg, c.pos_weight, c.pos_weight).loss)
                losses_ref.append(drift_loss(f, base_feats[rows], f.detach(), 1.0, 1.0, mask_negative_self=True).loss)
        pref, ref = torch.stack(losses_pref).mean(), torch.stack(losses_ref).mean()
        yield Update(pref + c.ref_weight * ref, {"loss_pref": pref.detach(), "loss_ref": ref.detach(),
                                                 "reward": reward.mean()})
