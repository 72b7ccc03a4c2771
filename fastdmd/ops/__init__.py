"""Fused ops of the DMD step, behind one switch.

    from fastdmd import ops
    ops.backend = "reference"   # or "triton", "native", or "auto" (default)

"auto" picks the fastest correct implementation for the inputs' device: the Triton kernels on
CUDA, the PyTorch references on CPU (where Triton only runs in its slow interpreter). Both
backends check their arguments with the same code (ops/checks.py) and raise the same ValueErrors.
"native" runs the optional C++/CUDA build of kernels/ (ops/native.py says how to build it) for
dmd_target and group_advantages; "auto" never picks it. MasterAdamW's update (master_adamw_) has no
native build: under "native" it takes auto's choice.
The Triton implementation of op X lives in ops/X_triton.py, imported on first use (importing
fastdmd.ops never needs a GPU); not in ops/X.py, because importing a submodule of that name would
replace the function ops.X with the module.
"""

from __future__ import annotations

from fastdmd.ops import reference
from fastdmd.ops.reference import DMDTarget, GroupAdvantages, MasterAdamWPlan, PolicyLoss

BACKENDS = ("auto", "triton", "reference", "native")
backend = "auto"


def resolve_backend(device) -> str:
    """The backend ("triton", "reference" or "native") that ops on tensors of `device` use."""
    if backend not in BACKENDS:
        raise ValueError(f"ops.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if getattr(device, "type", str(device)) == "cuda" else "reference"
    return backend


def dmd_target(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale=1.0, weights=None,
               noise=None, c=None, eps=1e-8) -> DMDTarget:
    """See fastdmd.ops.reference.dmd_target for the math."""
    chosen = resolve_backend(getattr(x0, "device", None))
    if chosen == "triton":
        from fastdmd.ops.dmd_target_triton import dmd_target as impl
    elif chosen == "native":
        from fastdmd.ops.native import dmd_target as impl
    else:
        impl = reference.dmd_target
    return impl(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights, noise, c, eps)


def group_advantages(rewards, group_size=None, group_ids=None, weights=None, eps=1e-6,
                     clip=5.0) -> GroupAdvantages:
    """See fastdmd.ops.reference.group_advantages for the math."""
    chosen = resolve_backend(getattr(rewards, "device", None))
    if chosen == "triton":
        from fastdmd.ops.group_advantages_triton import group_advantages as impl
    elif chosen == "native":
        from fastdmd.ops.native import group_advantages as impl
    else:
        impl = reference.group_advantages
    return impl(rewards, group_size, group_ids, weights, eps, clip)


def clipped_policy_loss(x_prev, mean, std, old_log_prob, advantages, clip_range) -> PolicyLoss:
    """See fastdmd.ops.reference.clipped_policy_loss for the math."""
    chosen = resolve_backend(getattr(x_prev, "device", None))
    if chosen == "native":
        raise ValueError("clipped_policy_loss has no native implementation; set "
                         "fastdmd.ops.backend to 'triton', 'reference' or 'auto' for it")
    if chosen == "triton":
        from fastdmd.ops.clipped_policy_loss_triton import clipped_policy_loss as impl
    else:
        impl = reference.clipped_policy_loss
    return impl(x_prev, mean, std, old_log_prob, advantages, clip_range)


def master_adamw_backend(device) -> str:
    """The backend master_adamw_ runs on tensors of `device`: resolve_backend's, except that "native" (which
    has no build of this op) takes auto's choice, so that an optimizer step never fails on it."""
    chosen = resolve_backend(device)
    if chosen == "native":
        return "triton" if getattr(device, "type", str(device)) == "cuda" else "reference"
    return chosen


def master_adamw_(masters, grads, exp_avgs, exp_avg_sqs, copies, *, lr, beta1, beta2, eps, weight_decay, step,
                  grad_scale=None, emas=None, ema_weight=0.0, skip=None) -> None:
    """See fastdmd.ops.reference.master_adamw_ for the math. Not a torch.library op: it runs in the
    optimizer's step, outside any compiled or differentiated code."""
    master_adamw_update_(MasterAdamWPlan(masters, exp_avgs, exp_avg_sqs, copies, emas), grads, lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                         ema_weight=ema_weight, skip=skip)


def master_adamw_update_(plan: MasterAdamWPlan, grads, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=None,
                         ema_weight=0.0, skip=None) -> None:
    """master_adamw_ on a plan's tensors (see fastdmd.ops.reference.MasterAdamWPlan): the repeated update of
    an optimizer, which checks and sends its fixed tensors' addresses once."""
    if master_adamw_backend(plan.device) == "triton":
        from fastdmd.ops.master_adamw_triton import master_adamw_update_ as impl
    else:
        impl = reference.master_adamw_update_
    impl(plan, grads, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
         grad_scale=grad_scale, ema_weight=ema_weight, skip=skip)


__all__ = ["BACKENDS", "DMDTarget", "GroupAdvantages", "MasterAdamWPlan", "PolicyLoss", "backend",
           "clipped_policy_loss", "dmd_target", "group_advantages", "master_adamw_", "master_adamw_backend",
           "master_adamw_update_", "reference", "resolve_backend"]
