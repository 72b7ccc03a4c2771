"""The FLUX family: diffusers' FluxTransformer2DModel (rectified flow, fastdmd.models.flow) from a
local diffusers directory (FluxPipeline.save_pretrained layout: transformer/, scheduler/, optionally
vae/ and text_encoder/ + text_encoder_2/ + tokenizers for the prompt cache).

The generator's samples are the unpacked latents [B, C, H, W]; the adapter packs them into FLUX's
2x2 patch sequence (FluxPipeline._pack_latents) with the image position ids, calls the transformer
at timestep sigma (FLUX takes sigma, not 1000 sigma) and unpacks the velocity. FLUX-dev is
guidance-distilled: its guidance is an embedding input (`model.flux_guidance`, 3.5 by default),
not a second unconditional forward, so its recipes keep dmd.guidance_scale = 1 (no CFG combine).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastdmd.models.flow import FlowAdapter
from fastdmd.models.prompts import TextEncoder, encoder_part, require_text_encoders, tokenizer_part

REQUIRED = ("transformer/config.json", "scheduler/scheduler_config.json")


class FluxAdapter(FlowAdapter):
    def __init__(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor, guidance: float):
        self.prompt_embeds, self.pooled, self.guidance = prompt_embeds, pooled, guidance
        self.null_index = prompt_embeds.shape[0] - 1

    def predict(self, model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = x_t.shape
        dtype = next(model.parameters()).dtype
        packed = FluxPipeline._pack_latents(x_t.to(dtype), batch, channels, height, width)
        img_ids = image_ids(height // 2, width // 2, x_t.device, dtype)
        txt = self.prompt_embeds[labels].to(dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=x_t.device, dtype=dtype)
        guidance = torch.full((batch,), self.guidance, device=x_t.device, dtype=torch.float32) \
            if model.config.guidance_embeds else None
        out = model(hidden_states=packed, encoder_hidden_states=txt, pooled_projections=self.pooled[labels].to(dtype),
                    timestep=sigma.to(dtype), img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width).to(x_t.dtype)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids, (0, row, column) per packed token, built on `device`:
    diffusers builds them on the CPU and copies them over, which a CUDA graph capture refuses
    (a copy from pageable host memory) and which makes every eager call wait for the copy."""
    rows = torch.arange(height, device=device, dtype=dtype)[:, None].expand(height, width)
    columns = torch.arange(width, device=device, dtype=dtype)[None, :].expand(height, width)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(height * width, 3)


def text_encoder(model_path: str, device: torch.device) -> TextEncoder:
    """FluxPipeline.encode_prompt over the directory's CLIP (text_encoder: the pooled vector) and T5
    (text_encoder_2: the token embeddings), each loaded from its own folder (no model_index.json needed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    require_text_encoders(model_path, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler",
                                                                  local_files_only=True),
        vae=None, transformer=None,
        text_encoder=encoder_part(model_path, CLIPTextModel, "text_encoder", device),
        tokenizer=tokenizer_part(model_path, CLIPTokenizer, "tokenizer"),
        text_encoder_2=encoder_part(model_path, T5EncoderModel, "text_encoder_2", device),
        tokenizer_2=tokenizer_part(model_path, T5TokenizerFast, "tokenizer_2"))

    @torch.no_grad()
    def encode(prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
        return embeds.float().cpu(), pooled.float().cpu()

    return encode
