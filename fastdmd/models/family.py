"""A model family: the teacher network, its adapter, the sample shape, the conditions and how to
show samples, behind one `load_family(cfg.model)` (the trainer knows nothing family-specific).

    digits  the shipped class-conditional UNet and classifier (fastdmd.models.digits)
    sd3     SD3 / SD3.5 transformer from a local diffusers directory (fastdmd.models.sd3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from fastdmd.models.flow import FlowAdapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Family:
    name: str
    teacher: nn.Module                               # frozen, unsharded
    adapter: FlowAdapter
    sample_shape: tuple[int, ...]                    # one generator sample (latent for SD3)
    condition_names: list[str]                       # index i -> class or prompt (null index excluded)
    build_net: Callable[[], nn.Module]               # a fresh network with the teacher's architecture
    decode: Callable[[torch.Tensor], torch.Tensor]   # samples -> images in [-1, 1] for grids and rewards
    classifier: nn.Module | None = None              # digits: FD features and the label reward
    teacher_file: str | None = None                  # digits: the weights file (teacher-eval cache key)

    @property
    def num_conditions(self) -> int:
        return len(self.condition_names)


def load_family(cfg, device: torch.device = torch.device("cpu")) -> Family:
    if cfg.family == "digits":
        return _digits(cfg)
    if cfg.family == "sd3":
        return _sd3(cfg, device)
    raise ValueError(f"model.family {cfg.family!r} is not known; choose digits or sd3")


def _digits(cfg) -> Family:
    from fastdmd.data.digits import IMAGE_SIZE, NUM_CLASSES
    from fastdmd.models.digits import ASSETS_DIR, TEACHER_FILE, DigitsFlowAdapter, build_digits_unet, load_digits_assets

    assets = cfg.path or ASSETS_DIR
    teacher, classifier, manifest = load_digits_assets(assets)
    overrides = manifest.get("unet_config_overrides", {})
    return Family("digits", teacher, DigitsFlowAdapter(), (1, IMAGE_SIZE, IMAGE_SIZE),
                  [str(c) for c in range(NUM_CLASSES)], lambda: build_digits_unet(**overrides), lambda x: x,
                  classifier=classifier, teacher_file=os.path.join(assets, TEACHER_FILE))


def _sd3(cfg, device) -> Family:
    from fastdmd.models import sd3

    sd3.check_model_dir(cfg.path)
    dtype = DTYPES[cfg.dtype]
    prompts = sd3.read_prompts(cfg.prompts)
    embeds, pooled = sd3.prompt_embeddings(cfg.path, prompts, cfg.prompt_cache, cfg.max_sequence_length)
    teacher = sd3.load_transformer(cfg.path, dtype).eval().requires_grad_(False)
    vae = sd3.load_vae(cfg.path, dtype)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    size = cfg.resolution // scale if cfg.resolution else teacher.config.sample_size
    shape = (teacher.config.in_channels, size, size)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if vae is None:  # no VAE in the directory: show the first latent channel
            return latents[:, :1].clamp(-1, 1)
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.to(latents.device).decode(z).sample.float().clamp(-1, 1)

    return Family("sd3", teacher, sd3.SD3Adapter(embeds.to(device), pooled.to(device)), shape, prompts,
                  lambda: type(teacher).from_config(teacher.config), decode)


SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)  # stabilityai/stable-diffusion-3-medium
SD3_PROMPT_TOKENS = 77 + 256  # CLIP tokens + T5 tokens, concatenated


def random_sd3_family(num_layers: int | None = None, resolution: int = 1024, num_prompts: int = 8,
                      dtype: torch.dtype = torch.bfloat16, device: torch.device = torch.device("cpu"),
                      seed: int = 0) -> Family:
    """The SD3-medium architecture with random weights and random prompt embeddings, built in memory:
    the shape of the real thing for throughput measurements, no download."""
    from diffusers import SD3Transformer2DModel

    from fastdmd.models.sd3 import SD3Adapter

    config = SD3_MEDIUM | ({"num_layers": num_layers} if num_layers else {})
    torch.manual_seed(seed)
    with torch.device(device):
        teacher = SD3Transformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(num_prompts + 1, SD3_PROMPT_TOKENS, config["joint_attention_dim"], generator=gen)
    pooled = torch.randn(num_prompts + 1, config["pooled_projection_dim"], generator=gen)
    size = resolution // 8
    return Family("sd3", teacher, SD3Adapter(embeds.to(device), pooled.to(device)), (config["in_channels"], size, size),
                  [f"prompt {i}" for i in range(num_prompts)], lambda: SD3Transformer2DModel(**config),
                  lambda x: x[:, :1].clamp(-1, 1))
