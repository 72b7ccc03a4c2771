"""Training prompts and their cached text embeddings, shared by the text-to-image families.

Conditions are prompt indices: prompt i of `model.prompts` (a text file, one prompt per line); the
empty prompt is appended as the unconditional input. The cache (`model.prompt_cache`, default
~/.cache/fastdmd/prompts/<hash of model dir, prompts, length>) is a safetensors file with
`prompt_embeds` [P + 1, L, D] and `pooled` [P + 1, D_pooled] and the prompts in its metadata; with
the cache present the text encoders are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from fastdmd.config import ConfigError

# (prompts, max T5 tokens) -> ([P, L, D] embeddings, [P, D_pooled] pooled), fp32 on the CPU
TextEncoder = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]
LoadTextEncoder = Callable[[str, torch.device], TextEncoder]  # (model dir, device): loads the encoders once

ENCODE_BATCH = 32  # prompts per text-encoder call: thousands in one T5-XXL batch would not fit


def read_prompts(path: str) -> list[str]:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"model.prompts = {path!r}: expected a text file with one prompt per line")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"model.prompts {path} has no prompts; write one prompt per line")
    return prompts


class MissingTextEncoders(FileNotFoundError):
    def __init__(self, model_path: str, missing: list[str]):
        super().__init__(f"no prompt cache and {model_path} lacks {missing}: add the text encoders and tokenizers "
                         f"of the pipeline there, or give model.prompt_cache a precomputed file")
        self.model_path, self.missing = model_path, missing


def require_text_encoders(model_path: str, folders: tuple[str, ...]) -> None:
    """Encoding prompts needs the pipeline's text encoders and tokenizers; say which are missing."""
    missing = [d for d in folders if not os.path.isdir(os.path.join(model_path, d))]
    if missing:
        raise MissingTextEncoders(model_path, missing)


def default_cache_path(model_path: str, prompts: list[str], max_sequence_length: int) -> str:
    digest = hashlib.sha256(json.dumps([os.path.abspath(model_path), prompts, max_sequence_length]).encode())
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "fastdmd", "prompts", digest.hexdigest()[:24] + ".safetensors")


def save_prompt_cache(path: str, prompts: list[str], embeds: torch.Tensor, pooled: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # one per writer: nodes may share the folder
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


def encoder_part(model_path: str, cls, folder: str, device: torch.device):
    """A text encoder from model_path/folder on `device`, in fp32 wherever it runs (a cache must not
    depend on the machine that built it)."""
    return cls.from_pretrained(model_path, subfolder=folder, dtype=torch.float32, local_files_only=True).to(device)


def tokenizer_part(model_path: str, cls, folder: str):
    return cls.from_pretrained(model_path, subfolder=folder, local_files_only=True)


def encode_all(encode: TextEncoder, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode` over `prompts` in batches of ENCODE_BATCH, with a progress bar when there is more than one."""
    from tqdm import tqdm

    starts = range(0, len(prompts), ENCODE_BATCH)
    parts = [encode(prompts[i:i + ENCODE_BATCH], max_sequence_length)
             for i in tqdm(starts, desc="encoding prompts", unit="batch", disable=len(starts) < 2)]
    return torch.cat([e for e, _ in parts]), torch.cat([p for _, p in parts])


def prompt_embeddings(model_path: str, prompts: list[str], cache: str, max_sequence_length: int,
                      load_encoder: LoadTextEncoder, device: torch.device = torch.device("cpu")
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of prompts + [""], from the cache or computed with the text encoders (on `device`, in
    fp32 wherever they run, so that a cache does not depend on the machine that built it: T5-XXL
    takes ~19 GB for the moment) and cached."""
    cache = cache or default_cache_path(model_path, prompts, max_sequence_length)
    if os.path.isfile(cache):
        return load_prompt_cache(cache, prompts)
    print(f"prompt cache {cache} not found: encoding {len(prompts)} prompts with the text encoders of {model_path} "
          f"on {device}")
    encoder = load_encoder(model_path, device)
    embeds, pooled = encode_all(encoder, prompts + [""], max_sequence_length)
    del encoder
    if device.type == "cuda":  # the encoders' blocks back to the GPU before the networks come
        torch.cuda.empty_cache()
    save_prompt_cache(cache, prompts, embeds, pooled)
    return embeds, pooled
