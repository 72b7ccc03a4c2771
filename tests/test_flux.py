"""The FLUX family through the user's loading path: a tiny random FluxTransformer2DModel, VAE and
scheduler saved to a temp dir, a prompt file and a prompt cache; the adapter's packing checked
against diffusers' own FluxPipeline helpers."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from fastdmd.config import parse_args
from fastdmd.models.family import load_family
from fastdmd.train import main
from launch import torchrun
from tiny_pipeline import metrics_rows, one_rank_fsdp, run_args, save_pipeline_parts, text_encoder_parts

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_ids_are_the_pipelines(dtype):
    """Built on the device (a CUDA graph capture refuses diffusers' copy from the CPU), the same ids."""
    from fastdmd.models.flux import image_ids

    got = image_ids(3, 5, torch.device("cpu"), dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", dtype), rtol=0, atol=0)


def test_the_prompt_cache_is_what_the_pipelines_encode_prompt_gives(flux_dir, tmp_path):
    """A whole FluxPipeline.save_pretrained directory, as a user downloads it, with no prompt cache:
    its CLIP and T5 encoders, loaded folder by folder, give what FluxPipeline.encode_prompt gives."""
    root = tmp_path / "model"
    FluxPipeline(transformer=FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer"),
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                 **text_encoder_parts("flux", JOINT_DIM, POOLED_DIM)).save_pretrained(root)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = parse_args(["--recipe", "flux-dmd2", "--model.path", str(root), "--model.prompts", str(root / "prompts.txt"),
                      "--model.prompt_cache", str(tmp_path / "cache.safetensors"), "--model.max_sequence_length", "7"])
    family = load_family(cfg.model)
    reference = FluxPipeline.from_pretrained(root, local_files_only=True, vae=None)
    embeds, pooled, _ = reference.encode_prompt(prompt=PROMPTS + [""], prompt_2=None, max_sequence_length=7)
    assert family.adapter.prompt_embeds.shape == (len(PROMPTS) + 1, 7, JOINT_DIM)
    torch.testing.assert_close(family.adapter.prompt_embeds, embeds.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(family.adapter.pooled, pooled.float(), rtol=0, atol=1e-6)
    assert not torch.equal(family.adapter.pooled[0], family.adapter.pooled[1])
    main(run_args("flux-dmd2", root, tmp_path / "run", 16, "--trainer.steps", "1", "--eval.at_end", "false",
                  "--model.prompt_cache", str(tmp_path / "cache.safetensors"), "--model.max_sequence_length", "7"))
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_trains_two_steps_through_the_cli(flux_dir, tmp_path):
    main(args_for(flux_dir, tmp_path, "--trainer.steps", "2", "--eval.at_end", "true"))
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss_dmd"])) for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text())["family"] == "flux"
    assert (tmp_path / "samples_final.png").exists()


def test_master_weights_train_fused_qkv_copies(flux_dir, tmp_path):
    """perf.master_weights with perf.fuse_qkv on FLUX: the generator's and critic's bf16 copies run fused
    q/k/v projections (double- and single-stream blocks), the fp32 weights keep diffusers' names and
    are stepped from the fused gradients' rows; the copies hold them, rounded, after each update."""
    from fastdmd.distributed import World
    from fastdmd.trainer import Trainer

    cfg = parse_args(args_for(flux_dir, tmp_path, "--model.dtype", "bfloat16", "--perf.mixed_precision", "bf16",
                              "--perf.master_weights", "true", "--perf.fuse_qkv", "true", "--eval.at_end", "false",
                              "--trainer.lr_generator", "1e-3", "--trainer.lr_critic", "1e-3"))
    trainer = Trainer(cfg, World())
    assert trainer.fused_qkv == "teacher, generator copy, critic copy"
    copy_names = {n for n, _ in trainer.generator_compute.net.named_parameters()}
    assert any(n.endswith("attn.to_qkv.weight") for n in copy_names)
    assert not any(n.endswith("attn.to_q.weight") for n in copy_names)
    before = [w.detach().clone() for w in trainer._generator_copy[1]]
    for step in (1, 2):
        row = trainer.train_step(step)
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss_dmd", "loss_critic"))
    for pairs in (trainer._generator_copy, trainer._fake_copy):
        for c, w in zip(*pairs):
            assert torch.equal(c, w.detach().to(torch.bfloat16))
    moved = {name for (name, _), w, b in zip([(n, p) for n, p in trainer.generator.named_parameters() if p.requires_grad],
                                             trainer._generator_copy[1], before) if not torch.equal(w, b)}
    assert any(name.endswith("attn.to_k.weight") for name in moved)


def test_export_runs_in_flux_pipeline_at_four_steps_and_generates(flux_dir, tmp_path):
    """The exported directory in diffusers' FluxPipeline: num_inference_steps=4 gives the trained sigmas
    (its default sigmas pass through the exported scheduler unshifted). FluxPipeline re-noises packed
    latents, so its draws differ from fastdmd's per seed; the sampler is the same."""
    from diffusers import AutoencoderKL

    from fastdmd.export import main as export_main
    from fastdmd.generate import main as generate_main
    from fastdmd.models.prompts import load_prompt_cache
    from tiny_pipeline import CACHE

    main(args_for(flux_dir, tmp_path / "run", "--trainer.steps", "1", "--eval.at_end", "false"))
    out = tmp_path / "out"
    export_main([str(tmp_path / "run"), str(out)])
    pipe = FluxPipeline(transformer=FluxTransformer2DModel.from_pretrained(out, subfolder="transformer"),
                        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler"),
                        vae=AutoencoderKL.from_pretrained(out, subfolder="vae"),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    embeds, pooled = load_prompt_cache(str(flux_dir / CACHE), PROMPTS)
    images = pipe(prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[:1], num_inference_steps=4,
                  guidance_scale=3.5, height=16, width=16, output_type="pt").images
    assert pipe.scheduler.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    paths = generate_main([str(out), "--prompt", PROMPTS[0], "--num", "1", "--out", str(tmp_path / "png")])
    assert len(paths) == 2
    assert "null_label" not in json.loads((out / "fastdmd.json").read_text())


def test_an_export_initialises_the_generator_as_its_run_does(flux_dir, tmp_path):
    from fastdmd.distributed import World
    from fastdmd.export import main as export_main
    from fastdmd.runs import load_run_generator
    from fastdmd.trainer import Trainer

    main(args_for(flux_dir, tmp_path / "run", "--trainer.steps", "1", "--eval.at_end", "false",
                  "--trainer.lr_generator", "1e-3"))
    export_main([str(tmp_path / "run"), str(tmp_path / "out")])
    trained = load_run_generator(str(tmp_path / "run")).net.state_dict()
    for source in ("run", "out"):
        cfg = parse_args(args_for(flux_dir, tmp_path / f"from_{source}", "--model.init_generator", str(tmp_path / source)))
        weights = Trainer(cfg, World()).generator.net.state_dict()
        assert weights.keys() == trained.keys()
        assert all(torch.equal(weights[name], trained[name]) for name in trained), source


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rollout_and_scores_replay_cuda_graphs(flux_dir, tmp_path):
    """FLUX's calls capture (diffusers' image ids, copied from the CPU, made the capture fail and the
    run fall back to eager) and the graphed rollout is the eager one."""
    from fastdmd.distributed import World
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import Trainer, step_generator

    dev = torch.device("cuda")
    cfg = parse_args(args_for(flux_dir, tmp_path / "run", "--perf.cuda_graph_rollout", "true",
                              "--perf.cuda_graph_scores", "true"))
    trainer = Trainer(cfg, World(device=dev))
    for step in range(1, 3):
        trainer.train_step(step)
        noise, labels = torch.randn(2, 4, 8, 8, device=dev), torch.tensor([0, 1], device=dev)
        got = trainer.rollout(noise, labels, 3, step_generator(0, 0, step, dev))
        want = backward_simulation(trainer.generator, noise, labels, cfg.dmd.generator_sigmas, 3,
                                   step_generator(0, 0, step, dev))
        torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-4)  # TF32 matmuls are off by default
    assert trainer.rollout.active, trainer.rollout.reason
    assert trainer.scores_graphs == "CUDA graph"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp2_on_one_cuda_rank_trains_and_resumes_as_an_uninterrupted_run(flux_dir, tmp_path, monkeypatch):
    """FLUX under torchrun's FSDP2 path on one rank of nccl (tiny_pipeline.one_rank_fsdp; on CPU the two-rank
    test below runs it on gloo): the double- and the single-stream blocks each a unit, the bf16 policy (FLUX's
    guidance, like the time, left to the network's own cast), activation checkpointing, per-block compile, a DCP
    checkpoint at step 2 and a resume to step 3 (up to rounding), with the sample grid and the final evaluation
    on the sharded networks. Its CPU form (gloo, no compile) passed bit for bit when it was written."""
    sharded = one_rank_fsdp(monkeypatch, "cuda")
    common = ["--trainer.lr_schedule", "constant", "--trainer.checkpoint_every", "2", "--perf.mixed_precision", "bf16",
              "--perf.activation_checkpointing", "true", "--perf.compile", "true"]
    main(args_for(flux_dir, tmp_path / "straight", "--trainer.steps", "3", "--eval.at_end", "false", *common))
    # teacher, generator, critic: each network's double block and single block, then the network
    assert sum(isinstance(m, FluxTransformer2DModel) for m in sharded) == 3 and len(sharded) == 9
    main(args_for(flux_dir, tmp_path / "cut", "--trainer.steps", "2", "--eval.at_end", "false", *common))
    main(args_for(flux_dir, tmp_path / "cut", "--trainer.steps", "3", "--resume", "--trainer.sample_every", "3",
                  "--eval.at_end", "true", *common))
    straight, again = metrics_rows(tmp_path / "straight"), metrics_rows(tmp_path / "cut")
    assert [r["step"] for r in again] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss_dmd"])) for r in again)
    for want, got in zip(straight, again):
        for key in ("loss_dmd", "loss_critic", "grad_norm_generator"):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), (got["step"], key)
    assert (tmp_path / "cut" / "samples" / "step_0000003.png").exists() and (tmp_path / "cut" / "samples_final.png").exists()


@pytest.mark.distributed
def test_two_ranks_fsdp2_save_resume_and_sample_as_an_uninterrupted_run(flux_dir, tmp_path):
    """FLUX under torchrun on two gloo ranks: FSDP2's all-gathers and reduce-scatters over the double- and
    single-stream blocks, the bf16 policy, activation checkpointing; cut at step 2 and resumed, the run logs
    what the uninterrupted one does, and draws its grid and final evaluation with both ranks."""
    common = ["--trainer.lr_schedule", "constant", "--trainer.checkpoint_every", "2", "--perf.mixed_precision", "bf16",
              "--perf.activation_checkpointing", "true"]
    straight = torchrun(args_for(flux_dir, tmp_path / "straight", "--trainer.steps", "3", "--eval.at_end", "false",
                                 *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "x2 ranks" in straight.stdout and "activation_checkpointing=per block precision=bf16" in straight.stdout
    assert "returned a view tensor" not in straight.stderr  # FSDP2's warning, noise for FLUX (distributed.py)
    cut = torchrun(args_for(flux_dir, tmp_path / "cut", "--trainer.steps", "2", "--eval.at_end", "false", *common))
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = torchrun(args_for(flux_dir, tmp_path / "cut", "--trainer.steps", "3", "--resume", "--trainer.sample_every",
                                "3", "--eval.at_end", "true", *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics_rows(tmp_path / "cut") == metrics_rows(tmp_path / "straight")
    assert (tmp_path / "cut" / "samples" / "step_0000003.png").exists() and (tmp_path / "cut" / "samples_final.png").exists()
