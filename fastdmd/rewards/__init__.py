"""Reward models behind one interface (DESIGN.md, "rewards/").

Every reward is a callable `reward(images, labels, dmd=None) -> scores`: images [B, C, H, W] in
[-1, 1] (the generator's x0, decoded if latent), labels [B] (the class or prompt index), scores [B]
fp32, higher is better. `reward.differentiable` says whether the scores carry a gradient to the
images; the methods that backpropagate through a reward (DMDR, RTDMD's last step) call
`reward.require_differentiable(...)` once at set-up, so a non-differentiable reward fails loudly
there instead of silently adding a constant to the loss. `dmd` is the `ops.dmd_target` result
of the same samples; only `DistributionMatchingReward` (GNDM's R_dm) reads it.

Where rewards enter the step: after the generator forward (and, for GDMD, on the DMD targets),
in the `reward` phase. Policy-gradient methods turn the scores of a `CombinedReward` into group
advantages with `ops.group_advantages`: GNDMR each reward's (standardized per reward, then fused with
the weights), RTDMD the weighted sum's; DrPO ranks by the weighted sum; reward-backprop methods
(DMDR, RTDMD's last step) differentiate the weighted sum.

    from fastdmd.rewards import ClassifierLogProb, CombinedReward, JpegCompressibility
    reward = CombinedReward([ClassifierLogProb(classifier), JpegCompressibility()], [1.0, 0.1])
    s = reward.scores(images, labels)                      # s.per_reward [B, 2], s.total [B]
    adv = ops.group_advantages(s.per_reward, group_size=n, weights=s.weights).advantages

Text-to-image families score against their prompts with CLIP-architecture models from transformers
(fastdmd/rewards/clip.py: CLIPScore, PickScore, HPSv2), each loaded from a local folder:

    reward = PickScore("models/pickscore", prompts, dtype="bfloat16", micro_batch=16, device="cuda:1")
"""

from fastdmd.rewards.background import BackgroundReward
from fastdmd.rewards.base import CombinedReward, Reward, RewardScores
from fastdmd.rewards.clip import CLIPReward, CLIPScore, HPSv2, PickScore
from fastdmd.rewards.digits import ClassifierLogProb
from fastdmd.rewards.distribution_matching import DM_PROXIES, DistributionMatchingReward
from fastdmd.rewards.jpeg import JpegCompressibility

__all__ = ["build_reward", "BackgroundReward", "ClassifierLogProb", "CLIPReward", "CLIPScore", "CombinedReward",
           "DM_PROXIES", "DistributionMatchingReward", "HPSv2", "JpegCompressibility", "PickScore", "Reward",
           "RewardScores"]

CLIP_REWARDS = {cls.name: cls for cls in (CLIPScore, PickScore, HPSv2)}  # folder in reward.<name>_path
# reward.names -> class (for what a class says of itself, e.g. `differentiable`, before any is built)
REWARD_TYPES = {"classifier_log_prob": ClassifierLogProb, "jpeg": JpegCompressibility,
                "distribution_matching": DistributionMatchingReward, **CLIP_REWARDS}


def build_reward(cfg, classifier, prompts=None, device="cpu", decode=None) -> CombinedReward:
    """The CombinedReward named by a RewardConfig (reward.names, reward.weights).

    The CLIP-family rewards read their folder from reward.<name>_path and score against `prompts`
    (the family's condition names), on reward.device or else `device` (the training device)."""
    return CombinedReward([_make_reward(n, cfg, classifier, prompts, device) for n in cfg.name_list],
                          list(cfg.weights) or None, decode=decode)


def _make_reward(name, cfg, classifier, prompts, device) -> Reward:
    if name in CLIP_REWARDS:
        if prompts is None:
            raise ValueError(f"reward {name!r} scores images against prompts: pass the family's prompts to "
                             f"build_reward(..., prompts=family.condition_names)")
        return CLIP_REWARDS[name](getattr(cfg, f"{name}_path"), prompts, dtype=cfg.dtype,
                                  micro_batch=cfg.micro_batch, device=cfg.device or device)
    return {"classifier_log_prob": lambda: ClassifierLogProb(classifier), "jpeg": JpegCompressibility,
            "distribution_matching": lambda: DistributionMatchingReward(cfg.dm_proxy)}[name]()
