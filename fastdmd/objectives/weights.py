"""GDMD's reward-adaptive weights of the DMD targets (METHODS.md, "GDMD"; GDMD-like, our reading:
the paper's method section and code are not public).

Where it sits: after the K DMD targets T_k = sg(x0) - grad_k of each sample (K noise levels) have
been scored by the reward. Their advantages A [B, K] come from `gdmd.target_advantages`, with
each sample's K targets as one group: A_k = clip((r_k - mean_k r) / (std_k r + eps), -c, c)
(r: the [B, K, R] scores of R reward models on the targets, standardized each, summed with their weights). The weights from here go to
`ops.dmd_target(..., weights=w[:, k])` for target k, and the K losses are averaged:
loss = (1/K) sum_k w(A_k) * 0.5 * mean((x0 - T_k)^2).

Modes (all non-decreasing in A, so a better target never gets less weight):
- "linear" (default): w = max(0, 1 + lam * A). Mean 1 over a group while no weight is floored (A
  is standardized), so distillation keeps its strength; a target worse than the group by more
  than 1/lam standard deviations is dropped, never pushed away from.
- "softmax": w = K * softmax(A / tau) over the K targets: positive, sum exactly K (mean 1);
  tau -> 0 keeps only the best target, tau -> inf gives plain DMD.
- "signed": w = 1 + lam * A without the floor: the "toward positive, away from negative" variant.
  Targets worse than 1/lam standard deviations get a negative weight, i.e. the generator is
  pushed away from them; the group mean stays 1.
A group without reward signal (equal rewards: A = 0) gets w = 1 in every mode: plain DMD.
"""

from __future__ import annotations

import torch

from fastdmd.ops.checks import check_number, check_tensor

GDMD_WEIGHT_MODES = ("linear", "softmax", "signed")


def gdmd_weights(advantages: torch.Tensor, mode: str = "linear", lam: float = 0.5, tau: float = 1.0) -> torch.Tensor:
    """Per-target weights [B, K] (fp32) from group advantages [B, K] (row = one sample's K targets).
    lam (>= 0) is the slope of the linear modes, tau (> 0) the softmax temperature."""
    if mode not in GDMD_WEIGHT_MODES:
        raise ValueError(f"GDMD weight mode must be one of {GDMD_WEIGHT_MODES}, got {mode!r}")
    check_tensor("advantages", advantages, dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64))
    if advantages.dim() != 2 or advantages.numel() == 0:
        raise ValueError(f"advantages must be a non-empty [B, K] tensor (K targets per sample), "
                         f"got shape {tuple(advantages.shape)}")
    check_number("lam", lam, minimum=0)
    check_number("tau", tau)
    if tau <= 0:
        raise ValueError(f"tau must be > 0 (softmax temperature), got {tau!r}")
    a = advantages.detach().float()
    if mode == "softmax":
        return torch.softmax(a / tau, dim=1) * a.shape[1]
    w = 1.0 + lam * a
    return w.clamp_min(0.0) if mode == "linear" else w
