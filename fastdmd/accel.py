"""Optional accelerators, imported lazily: flash-attn / xformers attention for diffusers models and
NVIDIA apex's FusedAdam. Each falls back to what torch has (SDPA, fused AdamW) with a message that
says what is missing, and `describe()` reports what is in use for the run header.

NVIDIA apex is built from source (https://github.com/NVIDIA/apex); the PyPI package named `apex` is
an unrelated project and is never a dependency.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn

ATTENTION_PACKAGES = {"flash": "flash_attn", "xformers": "xformers"}
DIFFUSERS_BACKENDS = {"flash": "flash", "xformers": "xformers"}


def set_attention(net: nn.Module, choice: str) -> str:
    """Select the attention backend of a diffusers model; returns what is in use."""
    if choice == "sdpa":
        return "torch SDPA"
    package = ATTENTION_PACKAGES[choice]
    if importlib.util.find_spec(package) is None:
        return f"torch SDPA ({package} not installed; `pip install '.[accel]'` on a CUDA machine to use {choice})"
    if not torch.cuda.is_available():
        return f"torch SDPA ({choice} needs CUDA)"
    if not hasattr(net, "set_attention_backend"):
        return f"torch SDPA ({type(net).__name__} has no diffusers attention backends; {choice} not used)"
    net.set_attention_backend(DIFFUSERS_BACKENDS[choice])
    if not takes_attention_backend(net):
        return f"torch SDPA ({type(net).__name__}'s attention processors call torch SDPA themselves; {choice} not used)"
    return choice


def takes_attention_backend(net: nn.Module) -> bool:
    """Whether diffusers' set_attention_backend reaches any attention of `net`: it sets the backend on
    processors that dispatch through diffusers (FLUX's) and skips those that call torch SDPA directly
    (SD3's JointAttnProcessor2_0, the UNets' AttnProcessor2_0)."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in net.modules())


def make_adamw(params, lr: float, betas, weight_decay: float, perf) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, description): apex FusedAdam when asked and importable, else torch AdamW (fused or not;
    fused at beta1 0, DMD2's, as fastdmd.optim.NoMomentumAdamW: the same update without exp_avg)."""
    params = list(params)
    if perf.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            note = "apex FusedAdam not importable (build NVIDIA apex from source); "
        else:
            from torch.distributed.tensor import DTensor

            if params and isinstance(params[0], DTensor):  # its kernels read raw storage, which a DTensor has not
                note = "apex FusedAdam cannot step FSDP2's sharded (DTensor) parameters; "
            elif params and params[0].is_cuda:
                from fastdmd.optim import apex_adamw

                return (apex_adamw(FusedAdam)(params, lr=lr, betas=betas, weight_decay=weight_decay, adam_w_mode=True),
                        "apex FusedAdam")
            else:
                note = "apex FusedAdam needs CUDA; "
    else:
        note = ""
    if perf.fused_optimizer and betas[0] == 0:  # DMD2's beta1: the same fused update, no exp_avg kept
        from fastdmd.optim import NoMomentumAdamW

        return (NoMomentumAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay),
                note + "torch AdamW (fused; beta1 0: no exp_avg kept)")
    if perf.fused_optimizer:
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
        return opt, note + "torch AdamW (fused)"
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay), note + "torch AdamW (default)"
