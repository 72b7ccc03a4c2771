"""Input checks shared by the Triton kernels and their PyTorch references.

Both backends call the same check before doing any work, so a bad argument fails the same way on
CPU and on GPU, with a ValueError that names the argument, what it got and what would be valid,
instead of a shape error from inside a kernel (or, worse, a kernel that silently reads out of
bounds). The checks look at metadata only (shape, dtype, device), never at values, so they cost no
device synchronization and run unchanged while torch.compile traces with fake tensors.
"""

from __future__ import annotations

import math
import numbers

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The references also take float64: tests compute the exact answer with them.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, value, *, dtypes, shape=None, device=None) -> None:
    """Raise ValueError unless `value` is a tensor with one of `dtypes`, the given shape and device."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {_dtype_names(dtypes)}, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}; "
                         f"put all inputs on one device")


def check_per_sample(name: str, value, batch: int, device, dtypes) -> None:
    """A per-sample coefficient: a [B] tensor, one value per sample of the batch."""
    check_tensor(name, value, dtypes=dtypes, device=device)
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must be a [B] tensor with B={batch} (one value per sample), "
                         f"got shape {tuple(value.shape)}")


def check_number(name: str, value, *, minimum=None, positive=False, allow_none=False) -> None:
    """A finite Python/NumPy real number, optionally >= minimum, or > 0."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_batched(name: str, value, dtypes) -> None:
    check_tensor(name, value, dtypes=dtypes)
    if value.dim() < 1 or value.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [B, ...] tensor, got shape {tuple(value.shape)}")


def check_dmd_target_inputs(x0, x_t, real_cond, real_uncond, fake, a, b, guidance_scale, weights,
                            noise, c, eps, *, dtypes) -> None:
    """Arguments of dmd_target (see fastdmd.ops.reference.dmd_target)."""
    _check_batched("x0", x0, dtypes)
    batch, device = x0.shape[0], x0.device
    for name, value in (("x_t", x_t), ("real_cond", real_cond), ("real_uncond", real_uncond),
                        ("fake", fake), ("noise", noise)):
        if value is not None:
            check_tensor(name, value, dtypes=dtypes, shape=x0.shape, device=device)
    for name, value in (("a", a), ("b", b), ("weights", weights), ("c", c)):
        if value is not None:
            check_per_sample(name, value, batch, device, REFERENCE_DTYPES)
    check_number("guidance_scale", guidance_scale)
    check_number("eps", eps, minimum=0)
    if real_uncond is None and guidance_scale != 1.0:
        raise ValueError(f"real_uncond is required when guidance_scale != 1 "
                         f"(pred = uncond + g * (cond - uncond)), got guidance_scale={guidance_scale}")
    if (noise is None) != (c is None):
        given, missing = ("noise", "c") if c is None else ("c", "noise")
        raise ValueError(f"{given} was given without {missing}: the shared-noise term c * noise "
                         f"needs both (or neither)")


def check_group_advantages_inputs(rewards, group_size, group_ids, weights, eps, clip, *, dtypes) -> None:
    """Arguments of group_advantages (see fastdmd.ops.reference.group_advantages)."""
    check_tensor("rewards", rewards, dtypes=dtypes)
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty [N, K] tensor (N samples, K reward models), "
                         f"got shape {tuple(rewards.shape)}")
    n, k = rewards.shape
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_ids (one id "
                         f"per sample), got group_size={group_size!r} and "
                         f"group_ids={'None' if group_ids is None else 'a tensor'}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"the number of samples N={n} must be a multiple of group_size={group_size}")
    else:
        check_tensor("group_ids", group_ids, dtypes=(torch.int32, torch.int64), shape=(n,),
                     device=rewards.device)
    if weights is not None:
        check_tensor("weights", weights, dtypes=REFERENCE_DTYPES, shape=(k,), device=rewards.device)
    # eps = 0 would make a reward that is constant within a group 0 / 0; clip = 0 would zero every advantage
    check_number("eps", eps, positive=True)
    check_number("clip", clip, positive=True, allow_none=True)


def check_clipped_policy_loss_inputs(x_prev, mean, std, old_log_prob, advantages, clip_range, *,
                                     dtypes) -> None:
    """Arguments of clipped_policy_loss (see fastdmd.ops.reference.clipped_policy_loss)."""
    _check_batched("x_prev", x_prev, dtypes)
    batch, device = x_prev.shape[0], x_prev.device
    check_tensor("mean", mean, dtypes=dtypes, shape=x_prev.shape, device=device)
    for name, value in (("std", std), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        check_per_sample(name, value, batch, device, REFERENCE_DTYPES)
    check_number("clip_range", clip_range, minimum=0)


MASTER_DTYPE = torch.float32
COPY_DTYPES = (torch.bfloat16, torch.float16)


def check_master_adamw_tensors(masters, exp_avgs, exp_avg_sqs, copies, emas) -> None:
    """The tensors master_adamw_ updates in place (see fastdmd.ops.reference.master_adamw_), what a
    MasterAdamWPlan checks once: parallel lists, one entry per parameter, contiguous (the kernel walks
    their storage), the masters' shapes, fp32 but the copies (bf16 or fp16), on one device. exp_avgs, copies
    and emas may be None (no first moment kept: beta1 = 0 only, see check_master_adamw_update)."""
    lists = {"masters": masters, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "copies": copies, "emas": emas}
    lists = {name: value for name, value in lists.items() if value is not None or name in ("masters", "exp_avg_sqs")}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of tensors (one per parameter), got {type(value).__name__}")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the lists must have one entry per parameter, got lengths {lengths}")
    if not masters:
        return
    device = masters[0].device
    if not _tensor_lists_fit(lists, device):  # then find the first bad tensor and name it
        _check_each_tensor(lists, device)
    if device.type != "meta":
        _check_no_shared_memory(lists)


def _check_no_shared_memory(lists: dict) -> None:
    """Each tensor an update writes in place has its own memory: a parameter listed twice (tied weights) or a
    moment aliasing another would be read and written by two programs at once. The tensors are contiguous,
    so each is one span of addresses; sorted by start, any overlap shows between neighbours."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), f"{name}[{i}]")
                   for name, tensors in lists.items() for i, t in enumerate(tensors) if t.numel())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{second} shares memory with {first}; every tensor an update writes needs its own "
                             f"(list a tied parameter once)")


def check_master_adamw_update(grads, shapes, device, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                              ema_weight, skip=None, has_exp_avgs=True) -> None:
    """What changes from one update to the next: the gradients (one per parameter, of `shapes`, on `device`,
    one dtype, any strides), the numbers, and the skip flag (one bool or integer value on `device`).
    has_exp_avgs False (no first moments given) needs beta1 = 0, where the first moment is the gradient."""
    if not isinstance(grads, (list, tuple)):
        raise ValueError(f"grads must be a list of tensors (one per parameter), got {type(grads).__name__}")
    if len(grads) != len(shapes):
        raise ValueError(f"the lists must have one entry per parameter, got lengths "
                         f"{{'masters': {len(shapes)}, 'grads': {len(grads)}}}")
    if grads:
        try:
            dtypes = {g.dtype for g in grads}
            fits = ([g.shape for g in grads] == shapes and len(dtypes) == 1 and dtypes <= set(KERNEL_DTYPES)
                    and {g.device for g in grads} == {device})
        except AttributeError:  # not a tensor
            fits = False
        if not fits:  # find the first bad one and name it
            for i, (grad, shape) in enumerate(zip(grads, shapes)):
                check_tensor(f"grads[{i}]", grad, dtypes=KERNEL_DTYPES, shape=shape, device=device)
                if grad.dtype != grads[0].dtype:
                    raise ValueError(f"all grads must share one dtype, got {grads[0].dtype} and {grad.dtype} "
                                     f"(grads[{i}])")
    check_number("lr", lr, minimum=0)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        check_number(name, value, minimum=0)
        if value >= 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if not has_exp_avgs and beta1 != 0:
        raise ValueError(f"exp_avgs None (no first moment kept) needs beta1 = 0, where the first moment is the "
                         f"gradient; got beta1 = {beta1!r}: pass exp_avgs")
    check_number("eps", eps, minimum=0)
    check_number("weight_decay", weight_decay, minimum=0)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the update's number, for the bias corrections), got {step!r}")
    if grad_scale is not None:
        check_tensor("grad_scale", grad_scale, dtypes=(MASTER_DTYPE,), device=device)
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must hold one value (the clipping coefficient), got shape "
                             f"{tuple(grad_scale.shape)}")
    check_number("ema_weight", ema_weight, minimum=0)
    if ema_weight > 1:
        raise ValueError(f"ema_weight (1 - EMA decay) must be in [0, 1], got {ema_weight!r}")
    if skip is not None:
        check_tensor("skip", skip, dtypes=(torch.bool, torch.int32), device=device)
        if skip.numel() != 1:
            raise ValueError(f"skip must hold one value (nonzero: write nothing), got shape {tuple(skip.shape)}")


def _master_adamw_dtypes(name: str) -> tuple:
    return COPY_DTYPES if name == "copies" else (MASTER_DTYPE,)


def _tensor_lists_fit(lists: dict, device) -> bool:
    """The common case, checked list by list at little host cost (an optimizer step passes hundreds of
    tensors): same shapes as the masters, one allowed dtype per list, one device, contiguous."""
    try:
        shapes = [m.shape for m in lists["masters"]]
        for name, tensors in lists.items():
            dtypes = {t.dtype for t in tensors}
            if ([t.shape for t in tensors] != shapes or len(dtypes) != 1 or not dtypes <= set(_master_adamw_dtypes(name))
                    or {t.device for t in tensors} != {device} or not all(t.is_contiguous() for t in tensors)):
                return False
    except AttributeError:  # not a tensor
        return False
    return True


def _check_each_tensor(lists: dict, device) -> None:
    masters = lists["masters"]
    for i, master in enumerate(masters):
        for name, tensors in lists.items():
            value = tensors[i]
            check_tensor(f"{name}[{i}]", value, dtypes=_master_adamw_dtypes(name),
                         shape=None if name == "masters" else master.shape, device=device)
            if not value.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous (it is updated in place), got strides "
                                 f"{tuple(value.stride())} for shape {tuple(value.shape)}")
    if "copies" in lists and len({c.dtype for c in lists["copies"]}) > 1:
        raise ValueError(f"all copies must share one dtype, got {sorted({str(c.dtype) for c in lists['copies']})}")


def interpreted(kernel) -> bool:
    """Whether triton was imported in interpreter mode (TRITON_INTERPRET=1): `kernel` runs in Python."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_kernel_device(kernel, device: torch.device) -> None:
    """Triton kernels run on CUDA tensors, or anywhere when triton was imported in interpreter mode."""
    if device.type != "cuda" and not interpreted(kernel):
        raise ValueError(f"the triton backend needs CUDA tensors, got tensors on {device}; use "
                         f"fastdmd.ops.backend = 'reference' (or set TRITON_INTERPRET=1 before "
                         f"triton is imported to run the kernels in the slow interpreter)")
