"""LoRA adapters on a diffusers network with peft, and a scale that can change per call.

DMDR's dynamic distribution guidance (METHODS.md, "DMDR") uses one LoRA at two scales: the fake
score runs teacher + LoRA at `fake_lora_scale`, the real score runs teacher + the same LoRA at a
scale that decays to 0. `lora_alpha = rank`, so the scale set here is the multiplier of B @ A.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

LORA_TARGETS = ("conv1", "conv2", "time_emb_proj",  # every resnet of a diffusers UNet
                "to_q", "to_k", "to_v", "to_out.0")  # every attention of a UNet or an SD3 / FLUX transformer


def add_lora(net: nn.Module, rank: int) -> nn.Module:
    """Freeze `net` and give it a trainable LoRA of `rank` on its resnets (B starts at 0: the
    adapted network starts equal to `net`)."""
    net.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)), net)
    layers = lora_layers(net)
    if not layers:
        raise ValueError(f"no LoRA target {LORA_TARGETS} found in {type(net).__name__}")
    for layer in layers:
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
            p.requires_grad_(True)
    return net


def lora_layers(net: nn.Module) -> list[LoraLayer]:
    return [m for m in net.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def lora_scale(net: nn.Module, scale: float):
    """Run `net` with its LoRA multiplied by `scale` inside the block (0 = the base network)."""
    layers = lora_layers(net)
    before = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.scaling[name] = scale * layer.lora_alpha[name] / layer.r[name]
    try:
        yield net
    finally:
        for layer, saved in zip(layers, before):
            layer.scaling.update(saved)
