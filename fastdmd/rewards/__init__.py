"""Reward models behind one interface (DESIGN.md, "rewards/").

Every reward is a callable `reward(images, labels, dmd=None) -> scores`: images [B, C, H, W] in
[-1, 1] (the generator's x0, decoded if latent), labels [B] (the class or prompt index), scores [B]
fp32, higher is better. `reward.differentiable` says whether the scores carry a gradient to the
images; the methods that backpropagate through a reward (DMDR, RTDMD's last step) call
`reward.require_differentiable(...)` once at set-up, so a non-differentiable reward fails loudly
there instead of silently adding a constant to the loss. `dmd` is the `ops.dmd_target` result
of the same samples; only `DistributionMatchingReward` (GNDM's R_dm) reads it.

Where rewards enter the step: after the generator forward (and, for GDMD, on the DMD targets),
in the `reward` phase. Policy-gradient methods (RTDMD, GNDM, DrPO's ranking) turn the score
matrix of a `CombinedReward` into group advantages with `ops.group_advantages`; reward-backprop
methods (DMDR, RTDMD's last step) differentiate the weighted sum.

    from fastdmd.rewards import ClassifierLogProb, CombinedReward, JpegCompressibility
    reward = CombinedReward([ClassifierLogProb(classifier), JpegCompressibility()], [1.0, 0.1])
    s = reward.scores(images, labels)                      # s.per_reward [B, 2], s.total [B]
    adv = ops.group_advantages(s.per_reward, group_size=n, weights=s.weights).advantages
"""

from fastdmd.rewards.base import CombinedReward, Reward, RewardScores
from fastdmd.rewards.digits import ClassifierLogProb
from fastdmd.rewards.distribution_matching import DM_PROXIES, DistributionMatchingReward
from fastdmd.rewards.jpeg import JpegCompressibility

__all__ = ["build_reward", "ClassifierLogProb", "CombinedReward", "DM_PROXIES", "DistributionMatchingReward",
           "JpegCompressibility", "Reward", "RewardScores"]


def build_reward(cfg, classifier) -> CombinedReward:
    """The CombinedReward named by a RewardConfig (reward.names, reward.weights)."""
    made = {"classifier_log_prob": lambda: ClassifierLogProb(classifier), "jpeg": JpegCompressibility,
            "distribution_matching": DistributionMatchingReward}
    names = [n.strip() for n in cfg.names.split(",") if n.strip()]
    return CombinedReward([made[n]() for n in names], list(cfg.weights) or None)
