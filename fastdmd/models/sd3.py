"""The SD3 / SD3.5 family: diffusers' SD3Transformer2DModel (rectified flow, fastdmd.models.flow)
loaded from a local diffusers-format directory, conditioned on prompt embeddings that are computed
once with the pipeline's CLIP + T5 text encoders and cached to disk.

Expected directory (what `StableDiffusion3Pipeline.save_pretrained` writes, e.g. a download of
stabilityai/stable-diffusion-3-medium-diffusers):
    transformer/   config.json + weights            (required)
    scheduler/     scheduler_config.json            (required: FlowMatchEulerDiscreteScheduler)
    vae/           AutoencoderKL                    (optional: decodes sample grids and image rewards)
    text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/   (only to build the prompt cache)

Conditions are prompt indices: prompt i of `model.prompts` (a text file, one prompt per line); the
empty prompt is appended as the unconditional input of classifier-free guidance.
The prompt cache (`model.prompt_cache`, default <run-independent> ~/.cache/fastdmd/prompts/<hash>)
is a safetensors file with `prompt_embeds` [P + 1, L, D] and `pooled` [P + 1, D_pooled]; with the
cache present the text encoders are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fastdmd.config import ConfigError
from fastdmd.models.flow import FlowAdapter

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


def check_model_dir(path: str, family: str = "sd3", required=REQUIRED) -> None:
    if not path:
        raise FileNotFoundError(f"model.path is empty; the {family} family needs a local diffusers directory with "
                                f"{', '.join(required)} (e.g. a `huggingface-cli download ... --local-dir DIR`)")
    missing = [r for r in required if not os.path.isfile(os.path.join(path, r))]
    if missing:
        raise FileNotFoundError(f"model.path {path} is not a diffusers {family} directory: missing {missing}; expected "
                                f"{', '.join(required)} (as StableDiffusion3Pipeline.save_pretrained writes them)")


def read_prompts(path: str) -> list[str]:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"model.prompts = {path!r}: expected a text file with one prompt per line")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"model.prompts {path} has no prompts; write one prompt per line")
    return prompts


def default_cache_path(model_path: str, prompts: list[str], max_sequence_length: int) -> str:
    digest = hashlib.sha256(json.dumps([os.path.abspath(model_path), prompts, max_sequence_length]).encode())
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "fastdmd", "prompts", digest.hexdigest()[:24] + ".safetensors")


@torch.no_grad()
def encode_prompts(model_path: str, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[P + 1, L, D] and [P + 1, D_pooled] from the pipeline's own encode_prompt (last row: the empty prompt)."""
    from diffusers import StableDiffusion3Pipeline

    missing = [d for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
               if not os.path.isdir(os.path.join(model_path, d))]
    if missing:
        raise FileNotFoundError(f"no prompt cache and {model_path} lacks {missing}: add the text encoders and tokenizers "
                                f"of the pipeline there, or give model.prompt_cache a precomputed file")
    pipe = StableDiffusion3Pipeline.from_pretrained(model_path, transformer=None, vae=None, local_files_only=True)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts + [""], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return embeds.float().cpu(), pooled.float().cpu()


def save_prompt_cache(path: str, prompts: list[str], embeds: torch.Tensor, pooled: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({"prompt_embeds": embeds.contiguous(), "pooled": pooled.contiguous()}, tmp,
              metadata={"prompts": json.dumps(prompts)})
    os.replace(tmp, path)


def load_prompt_cache(path: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        cached = json.loads((f.metadata() or {}).get("prompts", "null"))
    if cached != prompts:
        raise ConfigError(f"prompt cache {path} was made for other prompts ({cached!r:.80}); delete it or point "
                         f"model.prompt_cache elsewhere")
    tensors = load_file(path)
    return tensors["prompt_embeds"], tensors["pooled"]


def prompt_embeddings(model_path: str, prompts: list[str], cache: str, max_sequence_length: int):
    cache = cache or default_cache_path(model_path, prompts, max_sequence_length)
    if os.path.isfile(cache):
        return load_prompt_cache(cache, prompts)
    embeds, pooled = encode_prompts(model_path, prompts, max_sequence_length)
    save_prompt_cache(cache, prompts, embeds, pooled)
    return embeds, pooled


def load_transformer(model_path: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(model_path, subfolder="transformer", torch_dtype=dtype,
                                                 local_files_only=True)


def load_vae(model_path: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if not os.path.isfile(os.path.join(model_path, "vae", "config.json")):
        return None
    return AutoencoderKL.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype,
                                         local_files_only=True).eval().requires_grad_(False)
