"""Plain PyTorch references of every fused op: the exact math, upcast to fp32 (or kept in fp64 when
given fp64), written for clarity. Tests and benchmarks compare the Triton kernels against these,
and `ops.backend = "reference"` runs the trainer on them.

Every [B, ...] tensor is seen as [B, M] (M = elements per sample, possibly 1), so "mean over the
non-batch dimensions" is always a mean over M elements.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from fastdmd.ops.checks import (REFERENCE_DTYPES, check_clipped_policy_loss_inputs,
                                check_dmd_target_inputs, check_group_advantages_inputs,
                                check_master_adamw_tensors, check_master_adamw_update)


class DMDTarget(NamedTuple):
    loss: torch.Tensor        # scalar fp32, differentiable w.r.t. x0: d loss / d x0 = weights * grad / N
    target: torch.Tensor      # x0 - grad, detached, dtype of x0
    normalizer: torch.Tensor  # [B] fp32: mean_{c,h,w} |x0 - x0_real| + eps
    grad_sq: torch.Tensor     # [B] fp32: mean_{c,h,w} grad^2
    cosine: torch.Tensor      # [B] fp32: cosine similarity of grad and p_real = x0 - x0_real


class GroupAdvantages(NamedTuple):
    advantages: torch.Tensor  # [N] fp32: fused, re-standardized, clipped; 0 in zero-variance groups
    valid: torch.Tensor       # [N] bool: False for samples of a group where every reward has std <= eps
    group_mean: torch.Tensor  # [G, K] fp32: per group and reward model (for logging)
    group_std: torch.Tensor   # [G, K] fp32: population std (unbiased=False)


class PolicyLoss(NamedTuple):
    loss: torch.Tensor        # [B] fp32: per-sample PPO clipped loss, differentiable w.r.t. mean (and std)
    log_prob: torch.Tensor    # [B] fp32: mean over elements of log N(x_prev; mean, std^2)
    ratio: torch.Tensor       # [B] fp32: exp(log_prob - old_log_prob)
    clip_frac: torch.Tensor   # [B] fp32: 1.0 where |ratio - 1| > clip_range


_compute_dtype_override: torch.dtype | None = None


@contextlib.contextmanager
def computed_in(dtype: torch.dtype):
    """Run the references in `dtype` instead of fp32/fp64.

    This is the plain low-precision PyTorch computation of the flash-attention tolerance rule:
    a kernel passes when its error is at most twice the error of PyTorch at the input precision.
    Used by tests only; not thread-safe.
    """
    global _compute_dtype_override
    previous, _compute_dtype_override = _compute_dtype_override, dtype
    try:
        yield
    finally:
        _compute_dtype_override = previous


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if _compute_dtype_override is not None:
        return _compute_dtype_override
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def dmd_target(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    real_cond: torch.Tensor,
    real_uncond: torch.Tensor | None,
    fake: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    guidance_scale: float = 1.0,
    weights: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> DMDTarget:
    """The DMD2 target and loss (METHODS.md, "DMD2").

    Raw model outputs become clean estimates x0_pred = a * x_t + b * pred (+ c * noise, the shared
    noise term of a CPS step back to s used by RTDMD); the real score uses CFG
    pred = uncond + g * (cond - uncond) (real_uncond may be None when g == 1).
    grad = (x0_fake - x0_real) / (mean|x0 - x0_real| + eps) per sample, non-finite -> 0,
    target = x0 - grad, loss = 0.5 * mean(w * (x0 - sg(target))^2) with per-sample weights w
    (default 1), so its gradient for x0 is w * grad / N. The weights are not under sg: a weight
    that requires grad gets d loss / d w_i = 0.5 * sum_j (x0 - target)_ij^2 / N.
    A non-finite x0 element makes the loss NaN (x0 - target = inf - inf) although its grad is 0:
    a diverged generator shows in the loss instead of being silently ignored.
    """
    check_dmd_target_inputs(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights,
                            noise, c, eps, dtypes=REFERENCE_DTYPES)
    dtype = _compute_dtype(x0)
    batch = x0.shape[0]

    def per_element(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(batch, -1).to(dtype)

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype)[:, None]

    x0_detached = per_element(x0)
    real = per_element(real_cond)
    if real_uncond is not None:
        uncond = per_element(real_uncond)
        real = uncond + guidance_scale * (real - uncond)
    base = per_sample(a) * per_element(x_t)
    if noise is not None:
        base = base + per_sample(c) * per_element(noise)
    x0_real = base + per_sample(b) * real
    x0_fake = base + per_sample(b) * per_element(fake)
    p_real = x0_detached - x0_real
    normalizer = p_real.abs().mean(dim=1) + eps
    grad = _finite_or_zero((x0_fake - x0_real) / normalizer[:, None])
    target = x0_detached - grad
    grad_sq = (grad**2).mean(dim=1)
    p_finite = _finite_or_zero(p_real)
    norms = torch.linalg.vector_norm(grad, dim=1) * torch.linalg.vector_norm(p_finite, dim=1)
    cosine = (grad * p_finite).sum(dim=1) / norms.clamp_min(1e-12)

    w = torch.ones(batch, dtype=dtype, device=x0.device) if weights is None else weights.to(dtype)
    residual = x0.reshape(batch, -1).to(dtype) - target
    loss = 0.5 * (w[:, None] * residual**2).mean()
    return DMDTarget(loss.float(), target.reshape(x0.shape).to(x0.dtype), normalizer.float(),
                     grad_sq.float(), cosine.float())


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    eps: float = 1e-6,
    clip: float | None = 5.0,
) -> GroupAdvantages:
    """Group-normalized, fused, clipped advantages of K rewards (METHODS.md, "Shared pieces").

    Groups are the samples of one prompt/class: contiguous runs of `group_size` rows, or the rows
    sharing a `group_ids` value (group g is the g-th smallest distinct id, torch.unique order).
    Per group and reward: mean and population std; z = (r - mean) / (std + eps); fusion
    f = sum_k weights_k * z_k (weights default to 1); f is re-standardized within its group the
    same way and clipped to [-clip, clip] (clip=None: no clipping). A group in which every reward
    has std <= eps carries no signal: its advantages are 0 and valid is False. Rewards are
    constants here (detached): advantages weight a policy gradient, they are not differentiated.
    """
    check_group_advantages_inputs(rewards, group_size, group_ids, weights, eps, clip,
                                  dtypes=REFERENCE_DTYPES)
    dtype = _compute_dtype(rewards)
    r = rewards.detach().to(dtype)
    n, k = r.shape
    if group_ids is None:
        index = torch.arange(n, device=r.device) // group_size
        num_groups = n // group_size
    else:
        distinct_ids, index = torch.unique(group_ids, return_inverse=True)
        num_groups = distinct_ids.numel()
    count = torch.bincount(index, minlength=num_groups).to(dtype)

    def group_mean(values: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((num_groups, *values.shape[1:]), dtype=dtype, device=r.device)
        return total.index_add_(0, index, values) / count.reshape(-1, *([1] * (values.dim() - 1)))

    def standardize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = group_mean(values)
        std = group_mean((values - mean[index]) ** 2).sqrt()
        return (values - mean[index]) / (std[index] + eps), mean, std

    z, mean, std = standardize(r)
    w = torch.ones(k, dtype=dtype, device=r.device) if weights is None else weights.detach().to(dtype)
    advantages = standardize((z * w).sum(dim=1))[0]
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    valid = (std > eps).any(dim=1)[index]
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    return GroupAdvantages(advantages.float(), valid, mean.float(), std.float())


def clipped_policy_loss(
    x_prev: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> PolicyLoss:
    """PPO clipped loss of one SDE step of the sampler (METHODS.md, RTDMD stage 2 and GNDM).

    log_prob = mean over the M elements of a sample of log N(x_prev; mean, std^2): the mean, not
    the sum, as in flow-GRPO, so log-probs and ratios do not scale with the latent size.
    ratio = exp(log_prob - old_log_prob); loss = max(-A * ratio, -A * clamp(ratio, 1 - clip,
    1 + clip)) per sample; clip_frac = (|ratio - 1| > clip). Always computed in fp32 or better:
    bf16 log-probs give NaN and on-policy ratios != 1. Gradients flow to mean and to std (if it
    requires grad); x_prev, old_log_prob and advantages are constants.
    """
    check_clipped_policy_loss_inputs(x_prev, mean, std, old_log_prob, advantages, clip_range,
                                     dtypes=REFERENCE_DTYPES)
    dtype = _compute_dtype(mean)
    batch = x_prev.shape[0]
    x = x_prev.detach().reshape(batch, -1).to(dtype)
    mu = mean.reshape(batch, -1).to(dtype)
    sigma = std.to(dtype)[:, None]
    log_density = -((x - mu) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    log_prob = log_density.mean(dim=1)
    ratio = torch.exp(log_prob - old_log_prob.detach().to(dtype))
    adv = advantages.detach().to(dtype)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    clip_frac = ((ratio.detach() - 1).abs() > clip_range).float()
    return PolicyLoss(loss.float(), log_prob.float(), ratio.float(), clip_frac)


@torch.no_grad()
def master_adamw_(
    masters: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor] | None,
    exp_avg_sqs: list[torch.Tensor],
    copies: list[torch.Tensor] | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor | None = None,
    emas: list[torch.Tensor] | None = None,
    ema_weight: float = 0.0,
    skip: torch.Tensor | None = None,
) -> None:
    """One AdamW update of fp32 master weights from low-precision gradients, in place (perf.master_weights).

    Per parameter, in fp32 (torch's fused AdamW, step number `step` >= 1):
        g = grad * grad_scale                       (grad_scale: the clipping coefficient, or 1)
        master *= 1 - lr * weight_decay
        exp_avg = beta1 * exp_avg + (1 - beta1) * g
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g^2
        master -= lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
        copy = master rounded to the copy's dtype   (the bf16 weights the next forward computes with)
        ema += ema_weight * (master - ema)          (the generator's EMA, ema_weight = 1 - decay)
    Non-finite gradients propagate into the weights, as in torch's AdamW: the trainer skips such steps,
    with `skip` (a one-element device tensor: nonzero, nothing is written) when it decides on the device.
    With beta1 = 0, exp_avg = g (it is written, not read: a non-finite exp_avg, which torch's AdamW would
    carry into the weights through 0 * exp_avg, is not read at all). exp_avgs may then be None: no first
    moment is kept (MasterAdamW's state at beta1 = 0), which saves its 4 B/param of memory and of writes.
    """
    master_adamw_update_(MasterAdamWPlan(masters, exp_avgs, exp_avg_sqs, copies, emas), grads, lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                         ema_weight=ema_weight, skip=skip)


class MasterAdamWPlan:
    """The tensors that repeated master_adamw_ updates write in place (an optimizer's masters, moments,
    copies and EMA), checked once. An update then takes only its gradients (new tensors after every
    backward) and its numbers (master_adamw_update_): the host work right after the trainer's
    synchronization no longer checks five lists of hundreds of tensors each step.

    A backend keeps what it derives from these tensors in `derived` (the Triton launcher: their
    addresses, written to the device once), together with the addresses it derived it from, and compares
    those of the masters and copies on each update: a parameter given new storage (`param.data = ...`,
    `module.to(...)`) is checked again and the derived data rebuilt. The moments and EMA tensors are not
    watched (their owners replace them with new tensors, which takes a new plan), nor is a tensor's
    shape changed in place while keeping its storage."""

    def __init__(self, masters, exp_avgs, exp_avg_sqs, copies=None, emas=None):
        check_master_adamw_tensors(masters, exp_avgs, exp_avg_sqs, copies, emas)
        self.masters, self.exp_avg_sqs = list(masters), list(exp_avg_sqs)
        self.exp_avgs = None if exp_avgs is None else list(exp_avgs)  # None: beta1 = 0 updates only
        self.copies = None if copies is None else list(copies)
        self.emas = None if emas is None else list(emas)
        self.shapes = [m.shape for m in self.masters]
        self.device = self.masters[0].device if self.masters else None
        self.derived: dict = {}

    def __len__(self) -> int:
        return len(self.masters)

    def recheck(self) -> None:
        check_master_adamw_tensors(self.masters, self.exp_avgs, self.exp_avg_sqs, self.copies, self.emas)
        self.shapes = [m.shape for m in self.masters]


@torch.no_grad()
def master_adamw_update_(plan: MasterAdamWPlan, grads: list[torch.Tensor], *, lr: float, beta1: float, beta2: float,
                         eps: float, weight_decay: float, step: int, grad_scale: torch.Tensor | None = None,
                         ema_weight: float = 0.0, skip: torch.Tensor | None = None) -> None:
    """master_adamw_ on a plan's tensors: grads[i] is the gradient of plan.masters[i]. skip: a one-element
    device tensor; nonzero, the update writes nothing (the trainer's non-finite loss or gradient, decided on
    the device so that the host need not wait for it; this reference reads it, the kernel does not)."""
    check_master_adamw_update(grads, plan.shapes, plan.device, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay, step=step, grad_scale=grad_scale, ema_weight=ema_weight,
                              skip=skip, has_exp_avgs=plan.exp_avgs is not None)
    if skip is not None and bool(skip.reshape(())):
        return
    masters, exp_avgs, exp_avg_sqs, copies, emas = (plan.masters, plan.exp_avgs, plan.exp_avg_sqs, plan.copies,
                                                    plan.emas)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    for i, master in enumerate(masters):
        g = grads[i].float()
        if grad_scale is not None:
            g = g * grad_scale.reshape(())
        v = exp_avg_sqs[i]
        master.mul_(1 - lr * weight_decay)
        if beta1 == 0:  # the first moment is the gradient: as the kernel, which does not read exp_avg then
            m = g if exp_avgs is None else exp_avgs[i].copy_(g)
        else:
            m = exp_avgs[i]
            m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        master.addcdiv_(m, denom, value=-step_size)
        if copies is not None:
            copies[i].copy_(master)
        if emas is not None:
            emas[i].lerp_(master, ema_weight)
