"""What the compiled backends (Triton and native) share about their custom ops: the output shapes
torch.compile traces with (fake implementations) and dmd_target's autograd. One definition here,
registered by each backend on its own op, so the two cannot drift apart.

dmd_target's custom op returns (loss, target, normalizer, grad_sq, cosine, residual_sq_sum [B],
residual) where residual = x0 - target in fp32 is saved only when x0 requires grad.
"""

from __future__ import annotations

from typing import Callable

import torch


def dmd_target_constants(x_t, real_cond, real_uncond, fake, a, b, noise, c) -> tuple:
    """dmd_target's inputs that get no gradient (the reference treats them as constants), detached: a
    custom op's output requires grad when any input does, and backward would then run silently, with no
    gradient to give, where the reference's loss refuses."""
    return tuple(None if t is None else t.detach() for t in (x_t, real_cond, real_uncond, fake, a, b, noise, c))


def dmd_target_fake(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights, noise, c, eps,
                    save_residual):
    normalizer, grad_sq, cosine, residual_sq_sum = (
        x0.new_empty((x0.shape[0],), dtype=torch.float32) for _ in range(4))
    residual = x0.new_empty(x0.shape if save_residual else (0,), dtype=torch.float32)
    return (x0.new_empty((), dtype=torch.float32), x0.new_empty(x0.shape), normalizer, grad_sq,
            cosine, residual_sq_sum, residual)


def dmd_target_backward_fake(residual, d_loss, weights, x0_dtype):
    return residual.new_empty(residual.shape, dtype=x0_dtype)


def dmd_target_setup_context(ctx, inputs, output):
    x0, weights = inputs[0], inputs[8]
    residual_sq_sum, residual = output[5], output[6]
    ctx.save_for_backward(residual, weights, residual_sq_sum)
    ctx.x0_dtype = x0.dtype
    ctx.numel = x0.numel()


def dmd_target_backward(backward_op: Callable) -> Callable:
    """The autograd backward of dmd_target for a backend whose d x0 kernel is `backward_op`
    (residual, d_loss, weights, x0_dtype) -> d x0; d weights is 0.5 * d_loss * sum(residual^2) / N."""

    def backward(ctx, d_loss, *unused_output_grads):
        residual, weights, residual_sq_sum = ctx.saved_tensors
        d_x0 = d_weights = None
        if ctx.needs_input_grad[0]:
            d_x0 = backward_op(residual, d_loss, weights, ctx.x0_dtype)
        if ctx.needs_input_grad[8]:
            d_weights = (d_loss * 0.5 / ctx.numel * residual_sq_sum).to(weights.dtype)
        return d_x0, None, None, None, None, None, None, None, d_weights, None, None, None, None

    return backward


def group_advantages_fake(rewards, group_size, group_ids, weights, eps, clip):
    num_samples, num_rewards = rewards.shape
    if group_ids is None:
        num_groups = num_samples // group_size
    else:
        num_groups = torch.library.get_ctx().new_dynamic_size()
    return (rewards.new_empty((num_samples,), dtype=torch.float32),
            rewards.new_empty((num_samples,), dtype=torch.bool),
            rewards.new_empty((num_groups, num_rewards), dtype=torch.float32),
            rewards.new_empty((num_groups, num_rewards), dtype=torch.float32))
