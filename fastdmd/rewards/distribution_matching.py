"""R_dm, distribution matching read as a reward (METHODS.md, "GNDM / GNDMR"; R_dm-inspired, our
reading: GNDM has no public code or method section).

R_dm(x) = log p_real(x) - log p_fake(x). Its gradient at noise level t is s_real - s_fake, and the
DMD op's `grad = (x0_fake - x0_real) / normalizer` is minus that gradient, rescaled per sample: the
DMD update is ascent on R_dm. The value of R_dm itself is not observable from one denoiser call, so
GNDMR needs a per-sample scalar that stands in for it when it is group-normalized next to external
rewards. This module turns the per-sample statistics that `ops.dmd_target` already returns into such
a scalar (no extra model call, no second pass over the images):

- "grad_sq" (default): -mean(grad^2), minus the squared size of the normalized DMD update, i.e. of
  the estimated ||grad R_dm||^2. It is 0 where teacher and critic agree about the sample (a
  stationary point of R_dm: distribution matching has nothing left to do there) and grows with the
  correction the matching still asks for. Chosen as default because it is measured in the units
  of the update the generator actually receives (same per-sample normalizer), so it neither
  favours low-contrast samples (whose raw disagreement is small only because they are faint) nor
  depends on the image scale.
- "disagreement": -mean((x0_fake - x0_real)^2) = -grad_sq * normalizer^2, the raw disagreement of
  the two denoisers in data units (not normalized; faint samples score well).
- "alignment": -cosine(grad, x0 - x0_real): high when the fake-vs-real correction is not along the
  direction in which the teacher would move the sample anyway.

All three are estimates at the one noise level t the op was called with: noisy per sample, which is
what GNDM's group statistics average out. Higher is better for all; constants (not differentiable).
"""

from __future__ import annotations

from fastdmd.rewards.base import Reward

DM_PROXIES = ("grad_sq", "disagreement", "alignment")


class DistributionMatchingReward(Reward):
    """R_dm proxy from `ops.dmd_target` statistics; pass the op's result as `dmd=`."""

    differentiable = False

    def __init__(self, proxy: str = "grad_sq"):
        if proxy not in DM_PROXIES:
            raise ValueError(f"R_dm proxy must be one of {DM_PROXIES}, got {proxy!r}")
        self.proxy = proxy
        self.name = f"distribution_matching_{proxy}"

    def score(self, images, labels, dmd):
        if dmd is None:
            raise ValueError(f"reward {self.name!r} reads the DMD statistics of the same samples: call it "
                             f"with dmd=ops.dmd_target(...) (or fastdmd.objectives.dmd2.dmd_loss(...))")
        if tuple(dmd.grad_sq.shape) != (images.shape[0],):
            raise ValueError(f"dmd statistics have shape {tuple(dmd.grad_sq.shape)} but there are "
                             f"{images.shape[0]} images; pass the dmd_target result of these samples")
        if self.proxy == "grad_sq":
            return -dmd.grad_sq
        if self.proxy == "disagreement":
            return -dmd.grad_sq * dmd.normalizer**2
        return -dmd.cosine
