"""Training prompts and their cached text embeddings, shared by the text-to-image families.

Conditions are prompt indices: prompt i of `model.prompts` (a text file, one prompt per line); the
empty prompt is appended as the unconditional input. The cache (`model.prompt_cache`, default
~/.cache/fastdmd/prompts/<hash of model dir, prompts, length>) is a safetensors file with
`prompt_embeds` [P + 1, L, D] and `pooled` [P + 1, D_pooled], with the prompts, the family and
max_sequence_length in its metadata; with the cache present the text encoders are never loaded. A cache
that disagrees with the run (prompts, family, length, or widths against the transformer's) is refused.
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


def save_prompt_cache(path: str, prompts: list[str], embeds: torch.Tensor, pooled: torch.Tensor, family: str = "",
                      max_sequence_length: int = 0) -> None:
    """The family and max_sequence_length go into the metadata beside the prompts, so that a cache reused
    under other settings is refused rather than fed to a network it was not made for."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # one per writer: nodes may share the folder
    metadata = {"prompts": json.dumps(prompts)}
    if family:
        metadata |= {"family": family, "max_sequence_length": str(max_sequence_length)}
    save_file({"prompt_embeds": embeds.contiguous(), "pooled": pooled.contiguous()}, tmp, metadata=metadata)
    os.replace(tmp, path)


_REDO = "delete it to encode the prompts again, or point model.prompt_cache elsewhere"


def cache_contents(path: str) -> tuple[dict[str, str], set[str]]:
    """(metadata, tensor names) of a prompt cache file, or a ConfigError that names it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"prompt cache {path} is not a readable safetensors file ({e}); {_REDO}") from None


def load_prompt_cache(path: str, prompts: list[str], family: str = "", max_sequence_length: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached embeddings, or a ConfigError that names what does not match: the prompts, and where the
    cache records them (fastdmd writes them since its caches carry them) the family and max_sequence_length."""
    metadata, names = cache_contents(path)
    cached = json.loads(metadata.get("prompts", "null"))
    if cached != prompts:
        raise ConfigError(f"prompt cache {path} was made for other prompts ({cached!r:.80}); {_REDO}")
    for key, wanted in (("family", family), ("max_sequence_length", str(max_sequence_length))):
        if family and key in metadata and metadata[key] != wanted:
            raise ConfigError(f"prompt cache {path} was made with model.{key} = {metadata[key]}, this run has "
                              f"{wanted}; {_REDO}")
    if not {"prompt_embeds", "pooled"} <= names:
        raise ConfigError(f"prompt cache {path} lacks {sorted({'prompt_embeds', 'pooled'} - names)}; {_REDO}")
    tensors = load_file(path)
    return tensors["prompt_embeds"], tensors["pooled"]


def check_prompt_widths(embeds: torch.Tensor, pooled: torch.Tensor, transformer_config, source: str) -> None:
    """The embeddings' widths against the transformer's inputs, before any training step multiplies them."""
    expected = {"prompt_embeds": transformer_config["joint_attention_dim"],
                "pooled": transformer_config["pooled_projection_dim"]}
    got = {"prompt_embeds": embeds.shape[-1], "pooled": pooled.shape[-1]}
    if got != expected:
        raise ConfigError(f"{source} gives prompt embeddings of widths {got}, but the transformer takes {expected} "
                          f"(joint_attention_dim, pooled_projection_dim): the embeddings are of another model")


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
                      load_encoder: LoadTextEncoder, device: torch.device = torch.device("cpu"), family: str = "",
                      transformer_config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of prompts + [""], from the `cache` file (model.prompt_cache, or default_cache_path's) or
    computed with the text encoders (on `device`, in fp32 wherever they run, so that a cache does not depend
    on the machine that built it: T5-XXL takes ~19 GB for the moment) and cached there; checked against
    `transformer_config`'s input widths."""
    if os.path.isfile(cache):
        embeds, pooled = load_prompt_cache(cache, prompts, family, max_sequence_length)
        if transformer_config is not None:
            check_prompt_widths(embeds, pooled, transformer_config, f"prompt cache {cache}")
        return embeds, pooled
    print(f"prompt cache {cache} not found: encoding {len(prompts)} prompts with the text encoders of {model_path} "
          f"on {device}")
    encoder = load_encoder(model_path, device)
    embeds, pooled = encode_all(encoder, prompts + [""], max_sequence_length)
    del encoder
    if device.type == "cuda":  # the encoders' blocks back to the GPU before the networks come
        torch.cuda.empty_cache()
    if transformer_config is not None:  # before the cache is written: a wrong encoder's output is not kept
        check_prompt_widths(embeds, pooled, transformer_config, f"the text encoders of {model_path}")
    save_prompt_cache(cache, prompts, embeds, pooled, family, max_sequence_length)
    return embeds, pooled
