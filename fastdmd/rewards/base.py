"""The reward interface and the combination of several rewards (see fastdmd.rewards)."""

from __future__ import annotations

import abc
from typing import Callable, NamedTuple, Sequence

import torch

from fastdmd.ops import DMDTarget
from fastdmd.ops.checks import check_number, check_tensor

IMAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


class Reward(abc.ABC):
    """One reward model. Subclasses set `name` and `differentiable` and implement `score`."""

    name: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, dmd: DMDTarget | None = None) -> torch.Tensor:
        check_tensor("images", images, dtypes=IMAGE_DTYPES)
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty [B, C, H, W] tensor, got shape {tuple(images.shape)}")
        check_tensor("labels", labels, dtypes=(torch.int32, torch.int64), shape=(images.shape[0],),
                     device=images.device)
        scores = self.score(images, labels, dmd)
        if tuple(scores.shape) != (images.shape[0],):
            raise AssertionError(f"reward {self.name!r} returned shape {tuple(scores.shape)}, "
                                 f"expected ({images.shape[0]},)")
        return scores.float()

    @abc.abstractmethod
    def score(self, images: torch.Tensor, labels: torch.Tensor, dmd: DMDTarget | None) -> torch.Tensor:
        """Scores [B], higher is better (inputs already checked by __call__)."""

    def require_differentiable(self, purpose: str) -> None:
        """Raise unless gradients flow from the scores to the images (call once at set-up)."""
        if not self.differentiable:
            raise ValueError(f"{purpose} backpropagates through the reward, but reward {self.name!r} is "
                             f"not differentiable; use a differentiable reward (e.g. classifier_log_prob) "
                             f"there, and non-differentiable ones through group advantages")


class RewardScores(NamedTuple):
    per_reward: torch.Tensor  # [B, K] fp32: column k is reward k's scores
    weights: torch.Tensor     # [K] fp32 on the scores' device
    total: torch.Tensor       # [B] fp32: per_reward @ weights, differentiable when every part is


class CombinedReward(Reward):
    """K rewards with weights: the score matrix [B, K] and the weighted sum sum_k w_k r_k.

    GNDMR and GDMD standardize each reward of the matrix within its group before fusing with the
    weights (there the weights are relative importances, not unit conversions). The raw weighted sum
    is what RTDMD standardizes for its advantages (there the weights also convert units), what
    reward-backprop losses differentiate (e.g. RTDMD's relu(3 - sum_k w_k r_k)) and what gets logged.
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        rewards = list(rewards)
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward, got none")
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if len(weights) != len(rewards):
            raise ValueError(f"got {len(weights)} weights for {len(rewards)} rewards "
                             f"({[r.name for r in rewards]}); give one weight per reward")
        for r, w in zip(rewards, weights):
            check_number(f"weight of reward {r.name!r}", w)
        self.rewards, self.weights = rewards, [float(w) for w in weights]
        self.names = tuple(r.name for r in rewards)
        self.name = " + ".join(f"{w:g}*{n}" for w, n in zip(self.weights, self.names))
        self.differentiable = all(r.differentiable for r in rewards)
        self.decode = decode  # latent families: samples -> images in [-1, 1] before any reward sees them

    def scores(self, images: torch.Tensor, labels: torch.Tensor, dmd: DMDTarget | None = None) -> RewardScores:
        if self.decode is not None:
            images = self.decode(images)
        per_reward = torch.stack([r(images, labels, dmd) for r in self.rewards], dim=1)
        weights = torch.tensor(self.weights, dtype=torch.float32, device=per_reward.device)
        return RewardScores(per_reward, weights, per_reward @ weights)

    def score(self, images, labels, dmd):
        return self.scores(images, labels, dmd).total

    def require_differentiable(self, purpose: str) -> None:
        for r in self.rewards:
            r.require_differentiable(purpose)

