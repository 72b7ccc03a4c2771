"""The parts of a tiny diffusers text-to-image directory that SD3 and FLUX tests share: a random VAE
(2x down-sampling, 4 latent channels), a flow-matching scheduler, a prompt file and a precomputed
prompt-embedding cache (no text encoders), plus the command-line flags that point a run at it."""

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
