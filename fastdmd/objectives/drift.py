"""The drift field of "Generative Modeling via Drifting" as DrPO uses it (METHODS.md, "DrPO").

Where it sits: DrPO's loss phase, in a feature space (a frozen encoder's features of the decoded
samples; on digits the classifier's features or the latents). For the K samples of one prompt,
the field V(x) moves each generated feature x toward a positive set and away from a negative set;
the generator is trained by regressing x onto sg(x + V):
    L_pref = drift_loss(x, positives = top-ranked samples, negatives = bottom-ranked, w = eta)
    L_ref  = drift_loss(x, positives = the frozen base generator's outputs from the same noise,
                        negatives = x itself (mask_negative_self=True))
Continuous form: V(x) = E[k(x, y+) k(x, y-) (y+ - y-)] / (Z_p Z_q) with the Laplacian kernel
k(x, y) = exp(-||x - y|| / (scale * R)).

Empirical form, following the DrPO public code (src/drpo/drift.py) where METHODS.md is silent:
- targets = [sg(x) (weight `generated_weight`, 1), negatives (w_neg), positives (w_pos)];
- scale = the target-weighted mean distance from the generated samples to all targets; the
  kernel sees distances / scale, so the radii R are relative to the typical distance;
- self-pairs (x_i with its own copy among the targets, and with negative i if
  mask_negative_self) get +100 added to their scaled distance (the code's -100/R logit penalty:
  effectively excluded, but finite, so a batch of one sample stays NaN-free);
- per R: A = sqrt(max(softmax over targets * softmax over generated, 1e-6)) times the target
  weights (the floor, from the code, gives every target a minimum affinity of 1e-3 * weight);
  A- = the generated and negative columns, A+ = the positive columns;
  coefficients pos = A+ * sum(A-), neg = -A- * sum(A+) (they sum to 0 per row), and
  V_R(x_i) = sum_t coeff_it (y_t - x_i);
- each V_R is divided by its RMS over all elements (RMS floored at 1e-4), and V = sum_R V_R.
Coordinates: the field and the loss live in normalized coordinates u = x * sqrt(D) / scale, where the
typical distance is sqrt(D), i.e. each coordinate is O(1); loss = mean((u(x) - sg(u(x) + V))^2).
Note the generated block: with weight 1 the current samples always act as extra negatives (the
base drifting term "away from where the generator already is"), so V is not zero when positives
and negatives coincide; it is zero with generated_weight=0.
Our reading (not in the code): one group [N, D] per call; the code batches prompts [B, N, D] but
shares the scale and the RMS over the batch, here each prompt's group gets its own.
Computed in fp32 (fp64 kept), without grad; only drift_loss is differentiable (w.r.t. x).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from fastdmd.ops.checks import check_number, check_tensor

DRPO_RADII = (0.02, 0.05, 0.2)
FEATURE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
SELF_PENALTY = 100.0  # added to the scaled distance of masked self-pairs
AFFINITY_FLOOR_SQ = 1e-6  # floor of softmax * softmax before the square root
RMS_FLOOR_SQ = 1e-8  # floor of the mean square before normalizing a field to unit RMS


class DriftField(NamedTuple):
    field: torch.Tensor  # [N, D] V in normalized coordinates u = x * sqrt(D) / scale
    scale: torch.Tensor  # scalar: the weighted mean distance (x's units)
    rms: torch.Tensor    # [len(radii)] RMS of each V_R before its normalization (for logging)


class DriftLoss(NamedTuple):
    loss: torch.Tensor   # scalar fp32, differentiable w.r.t. x: d loss / d x = -2 V sqrt(D) / (N D scale)
    field: DriftField


def _anchor_weights(name: str, value, count: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, dtypes=FEATURE_DTYPES, shape=(count,), device=like.device)
        return value.detach().to(like.dtype)
    check_number(name, value, minimum=0)
    return torch.full((count,), float(value), dtype=like.dtype, device=like.device)


def _check_inputs(x, positives, negatives, radii, mask_negative_self) -> None:
    check_tensor("x", x, dtypes=FEATURE_DTYPES)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty [N, D] tensor of features (one group), got shape {tuple(x.shape)}")
    for name, value in (("positives", positives), ("negatives", negatives)):
        check_tensor(name, value, dtypes=FEATURE_DTYPES, device=x.device)
        if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] != x.shape[1]:
            raise ValueError(f"{name} must be a non-empty [M, D] tensor with D={x.shape[1]} (as x), "
                             f"got shape {tuple(value.shape)}")
    if not radii:
        raise ValueError(f"radii must be a non-empty sequence of positive numbers, e.g. {DRPO_RADII}, got {radii!r}")
    for r in radii:
        check_number("radius", r)
        if r <= 0:
            raise ValueError(f"every radius must be > 0, got {r!r} in {tuple(radii)}")
    if mask_negative_self and negatives.shape[0] != x.shape[0]:
        raise ValueError(f"mask_negative_self pairs x_i with negatives[i] (negatives = the samples themselves), "
                         f"so negatives must have N={x.shape[0]} rows, got {negatives.shape[0]}")


@torch.no_grad()
def drift_field(x: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                w_pos: float | torch.Tensor, w_neg: float | torch.Tensor,
                radii: Sequence[float] = DRPO_RADII, *, generated_weight: float = 1.0,
                mask_negative_self: bool = False) -> DriftField:
    """The drift field V at the generated features x [N, D] (see the module docstring).
    w_pos / w_neg: one weight for the set (DrPO: eta = 3000 for L_pref) or one per anchor [P] / [Q]."""
    _check_inputs(x, positives, negatives, radii, mask_negative_self)
    check_number("generated_weight", generated_weight, minimum=0)
    dtype = torch.promote_types(x.dtype, torch.float32)
    gen = x.detach().to(dtype)
    n, dim = gen.shape
    num_neg = negatives.shape[0]
    targets = torch.cat([gen, negatives.detach().to(dtype), positives.detach().to(dtype)])
    weights = torch.cat([torch.full((n,), float(generated_weight), dtype=dtype, device=gen.device),
                         _anchor_weights("w_neg", w_neg, num_neg, gen),
                         _anchor_weights("w_pos", w_pos, positives.shape[0], gen)])

    dist = torch.cdist(gen, targets, compute_mode="donot_use_mm_for_euclid_dist")
    scale = ((dist * weights).mean() / weights.mean().clamp_min(1e-12)).clamp_min(1e-12)
    scaled = dist / scale
    rows = torch.arange(n, device=gen.device)
    scaled[rows, rows] += SELF_PENALTY
    if mask_negative_self:
        scaled[rows, n + rows] += SELF_PENALTY

    to_u = math.sqrt(dim) / scale
    u, targets_u = gen * to_u, targets * to_u
    field, rms_per_radius = torch.zeros_like(u), []
    for radius in radii:
        logits = -scaled / radius
        affinity = (logits.softmax(dim=1) * logits.softmax(dim=0)).clamp_min(AFFINITY_FLOOR_SQ).sqrt() * weights
        negative, positive = affinity[:, :n + num_neg], affinity[:, n + num_neg:]
        coeff = torch.cat([-negative * positive.sum(dim=1, keepdim=True),
                           positive * negative.sum(dim=1, keepdim=True)], dim=1)
        v = coeff @ targets_u - coeff.sum(dim=1, keepdim=True) * u
        rms = v.pow(2).mean().clamp_min(RMS_FLOOR_SQ).sqrt()
        field += v / rms
        rms_per_radius.append(rms)
    return DriftField(field, scale, torch.stack(rms_per_radius))


def drift_loss(x: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
               w_pos: float | torch.Tensor, w_neg: float | torch.Tensor,
               radii: Sequence[float] = DRPO_RADII, *, generated_weight: float = 1.0,
               mask_negative_self: bool = False) -> DriftLoss:
    """loss = mean((u(x) - sg(u(x) + V))^2) in the normalized coordinates of `drift_field`;
    differentiable w.r.t. x only (positives, negatives, V and the scale are constants)."""
    field = drift_field(x, positives, negatives, w_pos, w_neg, radii, generated_weight=generated_weight,
                        mask_negative_self=mask_negative_self)
    to_u = math.sqrt(x.shape[1]) / field.scale
    u = x.to(field.field.dtype) * to_u
    goal = (u.detach() + field.field).detach()
    return DriftLoss(((u - goal) ** 2).mean().float(), field)
