"""The SD3 / SD3.5 family: diffusers' SD3Transformer2DModel (rectified flow, fastdmd.models.flow)
loaded from a local diffusers-format directory, conditioned on prompt embeddings computed once with
the pipeline's CLIP + T5 text encoders and cached (fastdmd.models.prompts).

Expected directory (what `StableDiffusion3Pipeline.save_pretrained` writes, e.g. a download of
stabilityai/stable-diffusion-3-medium-diffusers):
    transformer/   config.json + weights            (required)
    scheduler/     scheduler_config.json            (required: FlowMatchEulerDiscreteScheduler)
    vae/           AutoencoderKL                    (optional: decodes sample grids)
    text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/   (only to build the prompt cache)
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from fastdmd.models.flow import FlowAdapter
from fastdmd.models.prompts import TextEncoder, encoder_part, require_text_encoders, tokenizer_part

REQUIRED = ("transformer/config.json", "scheduler/scheduler_config.json")


class SD3Adapter(FlowAdapter):
    def __init__(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor):
        self.prompt_embeds, self.pooled = prompt_embeds, pooled
        self.null_index = prompt_embeds.shape[0] - 1

    def predict(self, model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return model(hidden_states=x_t.to(dtype), encoder_hidden_states=self.prompt_embeds[labels].to(dtype),
                     pooled_projections=self.pooled[labels].to(dtype),
                     timestep=sigma * self.num_train_timesteps).sample.to(x_t.dtype)


def check_model_dir(path: str, family: str, required=REQUIRED, pipeline: str = "StableDiffusion3Pipeline") -> None:
    if not path:
        raise FileNotFoundError(f"model.path is empty; the {family} family needs a local diffusers directory with "
                                f"{', '.join(required)} (e.g. a `huggingface-cli download ... --local-dir DIR`)")
    missing = [r for r in required if not os.path.isfile(os.path.join(path, r))]
    if missing:
        raise FileNotFoundError(f"model.path {path} is not a diffusers {family} directory: missing {missing}; expected "
                                f"{', '.join(required)} (as {pipeline}.save_pretrained writes them)")


def text_encoder(model_path: str, device: torch.device) -> TextEncoder:
    """StableDiffusion3Pipeline.encode_prompt over the directory's CLIP encoders (text_encoder,
    text_encoder_2) and T5 (text_encoder_3), each loaded from its own folder (no model_index.json
    needed). Without text_encoder_3 the T5 part is zeros, as in diffusers' pipeline without T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    require_text_encoders(model_path, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    t5 = all(os.path.isdir(os.path.join(model_path, d)) for d in ("text_encoder_3", "tokenizer_3"))
    if not t5:
        print(f"{model_path} has no text_encoder_3 / tokenizer_3: the T5 part of the prompt embeddings is zeros "
              f"(SD3 without T5)")
    pipe = StableDiffusion3Pipeline(
        # The architecture alone (meta device): the pipeline reads its width for the zeros without T5.
        transformer=load_transformer(model_path, torch.float32, weights=False),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler",
                                                                  local_files_only=True),
        vae=None, text_encoder=encoder_part(model_path, CLIPTextModelWithProjection, "text_encoder", device),
        tokenizer=tokenizer_part(model_path, CLIPTokenizer, "tokenizer"),
        text_encoder_2=encoder_part(model_path, CLIPTextModelWithProjection, "text_encoder_2", device),
        tokenizer_2=tokenizer_part(model_path, CLIPTokenizer, "tokenizer_2"),
        text_encoder_3=encoder_part(model_path, T5EncoderModel, "text_encoder_3", device) if t5 else None,
        tokenizer_3=tokenizer_part(model_path, T5TokenizerFast, "tokenizer_3") if t5 else None)

    @torch.no_grad()
    def encode(prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return embeds.float().cpu(), pooled.float().cpu()

    return encode


def transformer_config(model_path: str, cls_name: str = "SD3Transformer2DModel") -> dict:
    """model_path/transformer's config, without its weights."""
    import diffusers

    return getattr(diffusers, cls_name).load_config(model_path, subfolder="transformer", local_files_only=True)


def load_transformer(model_path: str, dtype: torch.dtype, cls_name: str = "SD3Transformer2DModel",
                     weights: bool = True) -> nn.Module:
    """The transformer from model_path/transformer; with `weights` False, its architecture alone, on the
    meta device (under torchrun the other ranks' networks take their weights from rank 0)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    if not weights:
        config = transformer_config(model_path, cls_name)
        with torch.device("meta"):
            net = cls.from_config(config)
        # nn.Module.to: diffusers' own .to warns against casting a built model (from_pretrained's
        # _keep_in_fp32_modules; none in SD3 / FLUX: fill_from_rank0 checks every dtype against rank 0's).
        return nn.Module.to(net, dtype)
    return cls.from_pretrained(model_path, subfolder="transformer", torch_dtype=dtype, local_files_only=True)


def load_vae(model_path: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if not os.path.isfile(os.path.join(model_path, "vae", "config.json")):
        return None
    return AutoencoderKL.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype,
                                         local_files_only=True).eval().requires_grad_(False)
