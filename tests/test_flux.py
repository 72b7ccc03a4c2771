"""The FLUX family through the user's loading path: a tiny random FluxTransformer2DModel, VAE and
scheduler saved to a temp dir, a prompt file and a prompt cache; the adapter's packing checked
against diffusers' own FluxPipeline helpers."""

import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from fastdmd.config import parse_args
from fastdmd.models.family import load_family
from fastdmd.train import main
from tiny_pipeline import run_args, save_pipeline_parts

JOINT_DIM, POOLED_DIM, TOKENS = 32, 24, 5
PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-tiny")
    torch.manual_seed(0)
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM,
                           guidance_embeds=True, axes_dims_rope=(2, 2, 4)).save_pretrained(root / "transformer")
    save_pipeline_parts(root, PROMPTS, TOKENS, JOINT_DIM, POOLED_DIM)
    return root


def args_for(root, run_dir, *extra):
    return run_args("flux-dmd2", root, run_dir, 16, *extra)


def test_adapter_packs_like_the_pipeline(flux_dir):
    fam = load_family(parse_args(args_for(flux_dir, "unused")).model)
    assert fam.sample_shape == (4, 8, 8) and fam.adapter.null_index == len(PROMPTS)
    x, s, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([1, 0])
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
    with torch.no_grad():
        direct = fam.teacher(hidden_states=packed, encoder_hidden_states=fam.adapter.prompt_embeds[y],
                             pooled_projections=fam.adapter.pooled[y], timestep=s,
                             img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype),
                             txt_ids=torch.zeros(TOKENS, 3), guidance=torch.full((2,), 3.5)).sample
        got = fam.adapter.predict(fam.teacher, x, s, y)
    torch.testing.assert_close(got, FluxPipeline._unpack_latents(direct, 16, 16, 2))


def test_trains_two_steps_through_the_cli(flux_dir, tmp_path):
    main(args_for(flux_dir, tmp_path, "--trainer.steps", "2", "--eval.at_end", "true"))
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss_dmd"])) for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text())["family"] == "flux"
    assert (tmp_path / "samples_final.png").exists()
