"""A model family: the teacher network, its adapter, the sample shape, the conditions and how to
show samples, behind one `load_family(cfg.model)` (the trainer knows nothing family-specific).

    digits  the shipped class-conditional UNet and classifier (fastdmd.models.digits)
    sd3     SD3 / SD3.5 transformer from a local diffusers directory (fastdmd.models.sd3)
    flux    FLUX transformer from a local diffusers directory (fastdmd.models.flux)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from fastdmd.config import ConfigError
from fastdmd.models.flow import FlowAdapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Family:
    name: str
    teacher: nn.Module                               # frozen, unsharded (on the meta device: weights not read)
    adapter: FlowAdapter
    sample_shape: tuple[int, ...]                    # one generator sample (latent for SD3)
    condition_names: list[str]                       # index i -> class or prompt (null index excluded)
    build_net: Callable[[], nn.Module]               # a fresh network with the teacher's architecture
    decode: Callable[[torch.Tensor], torch.Tensor]   # samples -> images in [-1, 1] for grids and rewards
    classifier: nn.Module | None = None              # digits: FD features and the label reward
    teacher_file: str | None = None                  # digits: the weights file (teacher-eval cache key)
    prompt_cache: str = ""                           # sd3 / flux: the prompt-embedding file read or written

    @property
    def num_conditions(self) -> int:
        return len(self.condition_names)


def cast_network(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`net` cast to `dtype` in place, without the warning that diffusers' ModelMixin.to gives on every cast to
    a dtype (0.42: "modules ... should be kept in float32: []", its own list empty). SD3, FLUX and the UNets
    keep no module in fp32 (`_keep_in_fp32_modules` None), so torch's Module.to casts them as
    from_pretrained(torch_dtype=...) loads them; a model that keeps some gets diffusers' own cast, whose
    warning is then to the point."""
    if getattr(net, "_keep_in_fp32_modules", None):
        return net.to(dtype)
    return nn.Module.to(net, dtype)


def load_family(cfg, device: torch.device = torch.device("cpu"), weights: bool = True) -> Family:
    """`weights` False: the teacher network is built on the meta device, its weights not read (the
    other ranks under torchrun, which receive them from rank 0 as the networks are sharded)."""
    if cfg.family == "digits":
        return _digits(cfg, weights)
    if cfg.family in ("sd3", "flux"):
        return _text_to_image(cfg, device, weights)
    raise ValueError(f"model.family {cfg.family!r} is not known; choose digits, sd3 or flux")


def _digits(cfg, weights: bool) -> Family:
    from fastdmd.data.digits import IMAGE_SIZE, NUM_CLASSES
    from fastdmd.models.digits import ASSETS_DIR, TEACHER_FILE, DigitsFlowAdapter, build_digits_unet, load_digits_assets

    assets = cfg.path or ASSETS_DIR
    teacher, classifier, manifest = load_digits_assets(assets, teacher_weights=weights)
    overrides = manifest.get("unet_config_overrides", {})
    return Family("digits", teacher, DigitsFlowAdapter(), (1, IMAGE_SIZE, IMAGE_SIZE),
                  [str(c) for c in range(NUM_CLASSES)], lambda: build_digits_unet(**overrides), lambda x: x,
                  classifier=classifier, teacher_file=os.path.join(assets, TEACHER_FILE))


def _text_to_image(cfg, device, weights: bool) -> Family:
    from fastdmd.models import flux, prompts, sd3

    module = {"sd3": sd3, "flux": flux}[cfg.family]
    sd3.check_model_dir(cfg.path, cfg.family, module.REQUIRED,
                        "StableDiffusion3Pipeline" if cfg.family == "sd3" else "FluxPipeline")
    dtype = DTYPES[cfg.dtype]
    names = prompts.read_prompts(cfg.prompts)
    cls_name = "SD3Transformer2DModel" if cfg.family == "sd3" else "FluxTransformer2DModel"
    cache = cfg.prompt_cache or prompts.default_cache_path(cfg.path, names, cfg.max_sequence_length)
    embeds, pooled = prompts.prompt_embeddings(cfg.path, names, cache, cfg.max_sequence_length,
                                               module.text_encoder, device, cfg.family,
                                               sd3.transformer_config(cfg.path, cls_name))
    teacher = sd3.load_transformer(cfg.path, dtype, cls_name, weights).eval().requires_grad_(False)
    vae = sd3.load_vae(cfg.path, dtype)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    if cfg.family == "sd3":
        adapter = sd3.SD3Adapter(embeds.to(device), pooled.to(device))
        channels = teacher.config.in_channels
        size = _latent_size(cfg.resolution, scale, teacher.config.patch_size, teacher.config.pos_embed_max_size) \
            if cfg.resolution else teacher.config.sample_size
    else:
        adapter = flux.FluxAdapter(embeds.to(device), pooled.to(device), cfg.flux_guidance)
        channels = teacher.config.in_channels // 4  # 2x2 patches packed into the channels
        # FLUX has no sample_size: 256 px by default
        size = _latent_size(cfg.resolution, scale, 2, None) if cfg.resolution else 2 * 16
    shape = (channels, size, size)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if vae is None:  # no VAE in the directory: show the first latent channel
            return latents[:, :1].clamp(-1, 1)
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.to(latents.device).decode(z).sample.float().clamp(-1, 1)

    return Family(cfg.family, teacher, adapter, shape, names, lambda: type(teacher).from_config(teacher.config), decode,
                  prompt_cache=cache)


def _latent_size(resolution: int, vae_scale: int, patch: int, max_patches: int | None) -> int:
    """model.resolution in latent pixels, or a ConfigError that names the resolutions the model takes: whole
    patches (FLUX packs 2x2 latent pixels), and for SD3 no more than its positional embedding covers."""
    step = vae_scale * patch
    largest = max_patches * step if max_patches else None
    if resolution % step or (largest and resolution > largest):
        valid = f"multiples of {step}" + (f" up to {largest}" if largest else "")
        why = f"VAE scale {vae_scale} x patch {patch}" + (f", pos_embed_max_size {max_patches}" if largest else "")
        raise ConfigError(f"model.resolution = {resolution} does not fit this model ({why}); use {valid} px")
    return resolution // vae_scale


SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)  # stabilityai/stable-diffusion-3-medium
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # black-forest-labs/FLUX.1-dev
PROMPT_TOKENS = {"sd3-medium": 77 + 256, "flux-dev": 512}  # SD3: CLIP + T5 tokens concatenated; FLUX: T5


def random_family(preset: str, depth: int | None = None, resolution: int = 1024, num_prompts: int = 8,
                  dtype: torch.dtype = torch.bfloat16, device: torch.device = torch.device("cpu"),
                  seed: int = 0) -> Family:
    """The SD3-medium or FLUX-dev architecture with random weights and random prompt embeddings, built in
    memory: the shape of the real thing for throughput measurements, no download. `depth` overrides
    the number of (double-stream) blocks; FLUX keeps twice as many single-stream blocks."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from fastdmd.models.flux import FluxAdapter
    from fastdmd.models.sd3 import SD3Adapter

    if preset == "sd3-medium":
        cls, config = SD3Transformer2DModel, SD3_MEDIUM | ({"num_layers": depth} if depth else {})
    elif preset == "flux-dev":
        cls, config = FluxTransformer2DModel, FLUX_DEV | ({"num_layers": depth, "num_single_layers": 2 * depth}
                                                          if depth else {})
    else:
        raise ValueError(f"preset {preset!r} is not known; choose sd3-medium or flux-dev")
    torch.manual_seed(seed)
    with torch.device(device):
        teacher = cast_network(cls(**config), dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(num_prompts + 1, PROMPT_TOKENS[preset], config["joint_attention_dim"], generator=gen).to(device)
    pooled = torch.randn(num_prompts + 1, config["pooled_projection_dim"], generator=gen).to(device)
    size = resolution // 8
    if preset == "sd3-medium":
        adapter, channels = SD3Adapter(embeds, pooled), config["in_channels"]
    else:
        adapter, channels = FluxAdapter(embeds, pooled, 3.5), config["in_channels"] // 4
    return Family(preset.split("-")[0], teacher, adapter, (channels, size, size),
                  [f"prompt {i}" for i in range(num_prompts)], lambda: cls(**config), lambda x: x[:, :1].clamp(-1, 1))
