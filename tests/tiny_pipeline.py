"""The parts of a tiny diffusers text-to-image directory that SD3 and FLUX tests share: a random VAE
(2x down-sampling, 4 latent channels), a flow-matching scheduler, a prompt file and a precomputed
prompt-embedding cache, plus the command-line flags that point a run at it; and tiny text encoders
with their tokenizers, for the tests of the path that builds the cache."""

import json
import os

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from fastdmd.models import prompts as prompt_cache

CACHE = "prompt_embeds.safetensors"


def save_pipeline_parts(root, prompts: list[str], tokens: int, joint_dim: int, pooled_dim: int) -> None:
    """Write vae/, scheduler/, prompts.txt and the prompt cache next to a transformer/ under `root`."""
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    gen = torch.Generator().manual_seed(1)
    prompt_cache.save_prompt_cache(str(root / CACHE), prompts,
                                   torch.randn(len(prompts) + 1, tokens, joint_dim, generator=gen),
                                   torch.randn(len(prompts) + 1, pooled_dim, generator=gen))


def run_args(recipe: str, root, run_dir, resolution: int, *extra) -> list[str]:
    """A tiny, fast run of `recipe` on the directory at `root` (fp32, batch 2, one critic update)."""
    return ["--recipe", recipe, "--model.path", str(root), "--model.prompts", str(root / "prompts.txt"),
            "--model.prompt_cache", str(root / CACHE), "--model.resolution", str(resolution),
            "--model.dtype", "float32", "--trainer.batch_size", "2", "--trainer.critic_updates", "1",
            "--trainer.log_every", "1", "--trainer.sample_every", "0", "--eval.teacher_steps", "2",
            "--trainer.warmup_steps", "0", "--run_dir", str(run_dir), "--threads", "1", *extra]


def text_encoder_parts(family: str, joint_dim: int, pooled_dim: int, t5: bool = True) -> dict:
    """Tiny random text encoders and tokenizers, built offline, as the pipeline's keyword arguments:
    sd3: two CLIPTextModelWithProjection (text_encoder, text_encoder_2, their projections splitting
    pooled_dim) and, with `t5`, a T5EncoderModel (text_encoder_3); flux: a CLIPTextModel of width
    pooled_dim and a T5EncoderModel (text_encoder_2). T5's width is joint_dim. The CLIP tokenizer has
    the letters and no merges (every word spelled out); the T5 tokenizer a few whole words, then
    letters. Traps avoided (DESIGN.md): the CLIP configs' eos_token_id is the tokenizer's end token,
    and T5's vocabulary is given as pieces and scores (its size checked)."""
    import string
    import tempfile

    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        clip_tokenizer = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                                       model_max_length=77)
    assert clip_tokenizer.eos_token_id == 1 and len(clip_tokenizer) == len(vocab)
    words = "a red blue green square circle triangle cat dog".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in string.ascii_lowercase]
    t5_tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    assert len(t5_tokenizer) == len(pieces)

    def clip(cls, width: int, projection: int = 0):
        torch.manual_seed(width + projection)
        config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                pad_token_id=1, **({"projection_dim": projection} if projection else {}))
        return cls(config)

    torch.manual_seed(3)
    t5_model = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=joint_dim, d_kv=8, d_ff=2 * joint_dim,
                                       num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1))
    if family == "sd3":
        first, second = pooled_dim // 2, pooled_dim - pooled_dim // 2
        parts = {"text_encoder": clip(CLIPTextModelWithProjection, 8, first), "tokenizer": clip_tokenizer,
                 "text_encoder_2": clip(CLIPTextModelWithProjection, 12, second), "tokenizer_2": clip_tokenizer}
        return parts | ({"text_encoder_3": t5_model, "tokenizer_3": t5_tokenizer} if t5 else
                        {"text_encoder_3": None, "tokenizer_3": None})
    return {"text_encoder": clip(CLIPTextModel, pooled_dim), "tokenizer": clip_tokenizer,
            "text_encoder_2": t5_model, "tokenizer_2": t5_tokenizer}


def one_rank_fsdp(monkeypatch, device: str) -> list:
    """`python -m fastdmd.train` in this process as a torchrun rank runs it, on one rank: each main() call
    joins a one-rank process group of the device's backend (cpu:gloo,cuda:nccl on a GPU; its own shutdown
    destroys it) and, being "distributed", shards its networks with FSDP2, which a real one-rank torchrun
    leaves whole. On a one-GPU machine this is as much of FSDP2 on CUDA as can run (NCCL refuses two ranks
    on one device). Returns the list that collects every module fully_shard is given."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    import fastdmd.train
    from fastdmd.distributed import World, process_group_backend

    sharded, fully_shard = [], fsdp.fully_shard
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: sharded.append(module) or fully_shard(module, **kw))

    def one_rank_world(timeout_s):
        if device == "cuda":
            torch.cuda.set_device(0)  # as init_world does for LOCAL_RANK 0
        dist.init_process_group(process_group_backend(device == "cuda"), rank=0, world_size=1, store=dist.HashStore())
        return World(rank=0, world_size=1, device=torch.device(device, 0) if device == "cuda" else torch.device(device))

    monkeypatch.setattr(fastdmd.train, "init_world", one_rank_world)
    monkeypatch.setattr(World, "distributed", property(lambda self: True))
    return sharded


def metrics_rows(run_dir) -> list[dict]:
    """The run's metrics.jsonl rows without their timings (samples_per_s, time)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("samples_per_s", "time")} for line in f]
