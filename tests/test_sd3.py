"""The SD3 family through the same loading path a user takes: a tiny random SD3 transformer, VAE and
scheduler saved with save_pretrained to a temp dir, a prompt file and a prompt-embedding cache."""

import json
import math
import os

import pytest
import torch
from diffusers import SD3Transformer2DModel

from fastdmd.config import ConfigError, parse_args
from fastdmd.models.family import load_family
from fastdmd.train import main
from launch import torchrun
from tiny_pipeline import CACHE, metrics_rows, one_rank_fsdp, run_args, save_pipeline_parts, text_encoder_parts

JOINT_DIM, POOLED_DIM, TOKENS = 32, 24, 6
PROMPTS = ["a red square", "a blue circle", "a green triangle"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-tiny")
    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                          caption_projection_dim=16, pooled_projection_dim=POOLED_DIM,
                          pos_embed_max_size=8).save_pretrained(root / "transformer")
    save_pipeline_parts(root, PROMPTS, TOKENS, JOINT_DIM, POOLED_DIM)
    return root


def _tiny_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                 caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=8)


@pytest.fixture(scope="module")
def sd3_pipeline_dir(tmp_path_factory):
    """What a user downloads: a whole StableDiffusion3Pipeline.save_pretrained directory (model_index.json,
    CLIP x2 + T5 text encoders and tokenizers, transformer, scheduler; no VAE), a prompt file, no cache."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("sd3-pipeline")
    StableDiffusion3Pipeline(transformer=_tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=None, **text_encoder_parts("sd3", JOINT_DIM, POOLED_DIM)).save_pretrained(root)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def args_for(root, run_dir, *extra):
    return run_args("sd3-dmd2", root, run_dir, 0, *extra)


def test_family_loads_the_transformer_prompts_and_vae(sd3_dir):
    cfg = parse_args(args_for(sd3_dir, "unused"))
    fam = load_family(cfg.model)
    assert fam.sample_shape == (4, 8, 8) and fam.condition_names == PROMPTS
    assert fam.adapter.null_index == len(PROMPTS)  # the empty prompt
    x, s, y = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.9]), torch.tensor([0, 2])
    with torch.no_grad():
        v = fam.adapter.predict(fam.teacher, x, s, y)
        direct = fam.teacher(hidden_states=x, encoder_hidden_states=fam.adapter.prompt_embeds[y],
                             pooled_projections=fam.adapter.pooled[y], timestep=s * 1000).sample
        cond, uncond = fam.adapter.predict_cond_uncond(fam.teacher, x, s, y)
    torch.testing.assert_close(v, direct)
    torch.testing.assert_close(cond, v)
    assert (uncond - cond).abs().max() > 0  # the empty prompt conditions differently
    images = fam.decode(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_trains_checkpoints_and_resumes_through_the_cli(sd3_dir, tmp_path):
    main(args_for(sd3_dir, tmp_path / "run", "--trainer.steps", "2", "--trainer.checkpoint_every", "1",
                  "--trainer.lr_schedule", "constant", "--eval.at_end", "true"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss_dmd"])) for r in rows) and rows[1]["loss_dmd"] > 0
    assert os.path.exists(tmp_path / "run" / "samples_final.png")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["family"] == "sd3" and summary["rows"]["0"] == PROMPTS[0]
    main(args_for(sd3_dir, tmp_path / "run", "--trainer.steps", "3", "--trainer.lr_schedule", "constant",
                  "--eval.at_end", "false", "--resume"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_a_resume_on_another_transformer_names_the_mismatch_and_keeps_the_checkpoint(sd3_dir, tmp_path, capsys):
    """A checkpoint that does not fit the networks (a resume pointed at another model directory) is not
    damaged: the error says what does not fit and which model setting changed, and does not advise
    deleting it; the run then resumes as it was."""
    import shutil

    main(args_for(sd3_dir, tmp_path / "run", "--trainer.steps", "1", "--eval.at_end", "false"))
    other = tmp_path / "wider"
    shutil.copytree(sd3_dir, other)
    shutil.rmtree(other / "transformer")
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                          attention_head_dim=8, num_attention_heads=3, joint_attention_dim=JOINT_DIM,
                          caption_projection_dim=16, pooled_projection_dim=POOLED_DIM,
                          pos_embed_max_size=8).save_pretrained(other / "transformer")
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["--resume", "--run_dir", str(tmp_path / "run"), "--trainer.steps", "2", "--model.path", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert "step_0000001 does not fit the networks this config builds (Size mismatch between saved" in err[0]
    assert f"this resume changes model.path from '{sd3_dir}' to '{other}'" in err[0] and "delete" not in err[0]
    main(["--resume", "--run_dir", str(tmp_path / "run"), "--trainer.steps", "2"])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_a_generator_of_another_family_is_refused_as_init_generator(sd3_dir, tmp_path, capsys):
    main(args_for(sd3_dir, tmp_path / "sd3", "--trainer.steps", "1", "--eval.at_end", "false"))
    with pytest.raises(SystemExit) as done:
        main(["--recipe", "digits-drpo", "--model.init_generator", str(tmp_path / "sd3"), "--trainer.steps", "1",
              "--run_dir", str(tmp_path / "drpo"), "--threads", "1"])
    assert done.value.code == 2
    assert (f"model.init_generator {tmp_path / 'sd3'} holds a sd3 generator; this run's model.family is digits"
            in capsys.readouterr().err)


def test_prompt_cache_for_other_prompts_is_refused(sd3_dir, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a yellow star\n")
    cfg = parse_args(args_for(sd3_dir, "unused", "--model.prompts", str(other)))
    with pytest.raises(ValueError, match="made for other prompts"):
        load_family(cfg.model)


def test_without_cache_or_text_encoders_the_error_says_what_to_add(sd3_dir, tmp_path):
    cfg = parse_args(args_for(sd3_dir, "unused", "--model.prompt_cache", str(tmp_path / "none.safetensors")))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_family(cfg.model)


@pytest.mark.parametrize("change, message", [
    (lambda root: ["--model.path", str(root / "missing")], "missing"),
    (lambda root: ["--model.path", str(root / "vae")], "transformer/config.json"),
    (lambda root: ["--model.prompts", str(root / "nothing.txt")], "one prompt per line"),
    (lambda root: ["--model.prompts", str(root / "vae" / "config.json")], "made for other prompts"),
    (lambda root: ["--model.resolution", "1024"], "model.resolution = 1024 does not fit this model (VAE scale 2 x "
                                                  "patch 2, pos_embed_max_size 8); use multiples of 4 up to 32 px"),
    (lambda root: ["--model.resolution", "18"], "model.resolution = 18 does not fit this model"),
])
def test_bad_paths_fail_with_one_line_naming_what_is_expected(sd3_dir, tmp_path, capsys, change, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args_for(sd3_dir, tmp_path / "run", *change(sd3_dir)))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _cache_file(path, prompts, tokens, joint_dim, pooled_dim, **recorded):
    from fastdmd.models.prompts import save_prompt_cache

    save_prompt_cache(str(path), prompts, torch.zeros(len(prompts) + 1, tokens, joint_dim),
                      torch.zeros(len(prompts) + 1, pooled_dim), **recorded)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda d: _cache_file(d / "widths.st", PROMPTS, TOKENS, 4096, 2048),
     "gives prompt embeddings of widths {'prompt_embeds': 4096, 'pooled': 2048}, but the transformer takes "
     "{'prompt_embeds': 32, 'pooled': 24}"),
    (lambda d: _cache_file(d / "flux.st", PROMPTS, TOKENS, JOINT_DIM, POOLED_DIM, family="flux", max_sequence_length=7),
     "was made with model.family = flux, this run has sd3; delete it to encode the prompts again"),
    (lambda d: _cache_file(d / "length.st", PROMPTS, TOKENS, JOINT_DIM, POOLED_DIM, family="sd3", max_sequence_length=9),
     "was made with model.max_sequence_length = 9, this run has 77"),
    (lambda d: (d / "cut.st").write_bytes(open(_cache_file(d / "full.st", PROMPTS, TOKENS, JOINT_DIM, POOLED_DIM),
                                               "rb").read()[:50]) and str(d / "cut.st"),
     "cut.st is not a readable safetensors file ("),
])
def test_a_prompt_cache_of_another_model_or_length_or_a_broken_one_is_refused(sd3_dir, tmp_path, capsys, make, message):
    """A cache given with model.prompt_cache is checked against the run before any network is loaded: what
    it records (family, max_sequence_length) and its widths against the transformer's config (a stale cache
    once trained with other prompt lengths, a foreign one crashed in the first matmul)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args_for(sd3_dir, tmp_path / "run", "--model.prompt_cache", make(tmp_path),
                      "--model.max_sequence_length", "77"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_cache_that_records_this_runs_settings_is_used(sd3_dir, tmp_path):
    cache = _cache_file(tmp_path / "ok.st", PROMPTS, TOKENS, JOINT_DIM, POOLED_DIM, family="sd3", max_sequence_length=77)
    fam = load_family(parse_args(args_for(sd3_dir, "unused", "--model.prompt_cache", cache,
                                          "--model.max_sequence_length", "77")).model)
    assert fam.adapter.prompt_embeds.abs().sum() == 0


def test_config_requires_path_and_prompts():
    with pytest.raises(ConfigError, match="model.path"):
        parse_args(["--recipe", "sd3-dmd2"])
    with pytest.raises(ConfigError, match="digits classifier"):
        parse_args(["--recipe", "sd3-dmd2", "--model.path", "x", "--model.prompts", "p", "--method", "dmdr"])
    with pytest.raises(ConfigError, match=r"reward \['jpeg'\] is not differentiable; choose from \['clip_score', "):
        parse_args(["--recipe", "sd3-dmd2", "--model.path", "x", "--model.prompts", "p", "--method", "dmdr",
                    "--reward.names", "jpeg"])
    with pytest.raises(ConfigError, match="method drpo runs on the digits family only"):
        parse_args(["--recipe", "sd3-dmd2", "--model.path", "x", "--model.prompts", "p", "--method", "drpo",
                    "--reward.names", "jpeg", "--reward.group_size", "4", "--model.init_generator", "x"])


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss_dmd"], r["loss_critic"]) for r in map(json.loads, f)]


@pytest.mark.distributed
def test_two_ranks_fsdp2_save_and_resume_match_an_uninterrupted_run(sd3_dir, tmp_path):
    """The uninterrupted run reads the weights on rank 0 alone (perf.load_on_rank0, the default), the
    cut run on every rank: their first steps agree too."""
    common = ["--trainer.lr_schedule", "constant", "--eval.at_end", "false", "--trainer.checkpoint_every", "2"]
    straight = torchrun(args_for(sd3_dir, tmp_path / "straight", "--trainer.steps", "3", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "x2 ranks" in straight.stdout and "weights: read by rank 0 alone" in straight.stdout
    cut = torchrun(args_for(sd3_dir, tmp_path / "cut", "--trainer.steps", "2", "--perf.load_on_rank0", "false",
                             *common))
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = torchrun(args_for(sd3_dir, tmp_path / "cut", "--trainer.steps", "3", "--resume", *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "straight")
    assert _losses(tmp_path / "straight")[-1][1] > 0


@pytest.mark.distributed
def test_two_ranks_bf16_policy_and_activation_checkpointing(sd3_dir, tmp_path):
    """... and the sample grid and final evaluation, which run the sharded networks on both ranks."""
    done = torchrun(args_for(sd3_dir, tmp_path / "mp", "--trainer.steps", "2", "--trainer.sample_every", "2",
                              "--perf.mixed_precision", "bf16", "--perf.activation_checkpointing", "true"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "activation_checkpointing=per block precision=bf16" in done.stdout
    losses = _losses(tmp_path / "mp")
    assert [s for s, _, _ in losses] == [1, 2] and all(0 < d < float("inf") for _, d, _ in losses)
    assert (tmp_path / "mp" / "samples" / "step_0000002.png").exists()
    assert (tmp_path / "mp" / "samples_final.png").exists() and done.stdout.count("samples/s per process; grids") == 1


def test_cast_network_casts_every_weight_without_diffusers_warning(monkeypatch):
    """diffusers 0.42's ModelMixin.to warns on every cast to a dtype ("should be kept in float32: []"), which
    the bf16 rollout copy printed on every run."""
    from diffusers.models import modeling_utils

    from fastdmd.models.family import cast_network

    said = []
    monkeypatch.setattr(modeling_utils.logger, "warning", lambda message, *args, **kwargs: said.append(message))
    net = _tiny_transformer()
    net.to(torch.float64)
    assert len(said) == 1 and "kept in float32: []" in said[0]  # what a run printed
    assert cast_network(net, torch.bfloat16) is net and len(said) == 1
    assert {t.dtype for t in [*net.parameters(), *net.buffers()] if t.is_floating_point()} == {torch.bfloat16}


def test_without_weights_the_transformer_is_its_config_on_the_meta_device(sd3_dir):
    from fastdmd.models.sd3 import load_transformer

    skeleton, whole = (load_transformer(sd3_dir, torch.bfloat16, weights=w) for w in (False, True))
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    assert {k: v for k, v in skeleton.config.items() if not k.startswith("_")} == \
        {k: v for k, v in whole.config.items() if not k.startswith("_")}
    assert [(n, t.shape, t.dtype) for n, t in skeleton.state_dict().items()] == \
        [(n, t.shape, t.dtype) for n, t in whole.state_dict().items()]


def test_gelu_epilogue_reaches_every_network_and_on_cpu_changes_no_number(sd3_dir, tmp_path):
    """perf.gelu_epilogue gives the teacher, the trained networks and their bf16 copies the epilogue form;
    on CPU (where it stands aside) the run's numbers are those of a run without it, bit for bit."""
    from fastdmd.distributed import World
    from fastdmd.models.fusion import GELUEpilogue
    from fastdmd.trainer import Trainer

    def trainer(*extra):
        cfg = parse_args(args_for(sd3_dir, tmp_path / "_".join(extra or ("plain",)), "--model.dtype", "bfloat16",
                                  "--perf.mixed_precision", "bf16", "--perf.master_weights", "true", "--perf.fuse_qkv",
                                  "true", "--eval.at_end", "false", *extra))
        return Trainer(cfg, World())

    plain, epilogue = trainer(), trainer("--perf.gelu_epilogue", "true")
    assert plain.gelu_epilogue == "off"
    nets = (epilogue.real.net, epilogue.generator.net, epilogue.fake.net, epilogue.generator_compute.net,
            epilogue.fake_compute.net)
    per_net = [sum(isinstance(m, GELUEpilogue) for m in net.modules()) for net in nets]
    assert len(set(per_net)) == 1 and per_net[0] > 0
    assert epilogue.gelu_epilogue == f"{5 * per_net[0]} feed-forward projections (no-grad forwards on CUDA)"
    for step in (1, 2):
        assert epilogue.train_step(step) | {"time": 0} == plain.train_step(step) | {"time": 0}


def test_grids_and_evaluation_sample_and_decode_in_pieces_of_eval_batch_size(sd3_dir, tmp_path, monkeypatch):
    """The 30-sample grids (3 prompts) at eval.batch_size 7: no network call and no VAE decode takes more
    than 7 samples (the teacher's cond and uncond in one forward: 14 rows), where one call once took the
    whole grid (200 rows of the teacher for SD3's 100 samples, at 1024 px)."""
    from fastdmd.distributed import World
    from fastdmd.trainer import Trainer

    cfg = parse_args(args_for(sd3_dir, tmp_path / "run", "--eval.batch_size", "7", "--trainer.steps", "1"))
    trainer = Trainer(cfg, World())
    rows, decoded = [], []
    forward = SD3Transformer2DModel.forward
    monkeypatch.setattr(SD3Transformer2DModel, "forward",
                        lambda self, *args, **kwargs: rows.append(len(kwargs["hidden_states"])) or forward(self, *args, **kwargs))
    decode = trainer.family.decode
    trainer.family.decode = lambda latents: decoded.append(len(latents)) or decode(latents)
    trainer._sample_grid()
    assert decoded == [7, 7, 7, 7, 2] and max(rows) == 7
    rows.clear(), decoded.clear()
    trainer.evaluate()
    assert decoded == [7, 7, 7, 7, 2] * 2 and max(rows) == 14 and len(rows) > 10
    assert os.path.exists(tmp_path / "run" / "samples_final.png")


def test_fused_qkv_teacher_and_rollout_copy_follow_the_trained_generator(sd3_dir, tmp_path, capsys):
    """perf.fuse_qkv fuses the networks that only run forward; the rollout's bf16 copy, fused, still
    takes the generator's weights after every step (written through the fused layers' rows)."""
    from fastdmd.distributed import World
    from fastdmd.trainer import Trainer

    cfg = parse_args(args_for(sd3_dir, tmp_path / "run", "--perf.fuse_qkv", "true", "--perf.mixed_precision", "bf16",
                              "--perf.rollout_weights", "bf16", "--trainer.steps", "2", "--eval.at_end", "false",
                              "--trainer.lr_generator", "1e-2"))  # steps that move bf16 weights
    trainer = Trainer(cfg, World())
    assert trainer.fused_qkv == "teacher, rollout copy"
    for net in (trainer.real.net, trainer.rollout_generator.net):
        assert not any(name.endswith("attn.to_q.weight") for name, _ in net.named_parameters())
    assert any(name.endswith("attn.to_q.weight") for name, _ in trainer.generator.net.named_parameters())
    x_t, sigma, labels = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.3]), torch.tensor([0, 2])
    to_qkv = dict(trainer.rollout_generator.net.named_parameters())["transformer_blocks.0.attn.to_qkv.weight"]
    before = to_qkv.clone()
    for step in (1, 2):
        trainer.train_step(step)
        with torch.no_grad(), trainer._autocast():
            torch.testing.assert_close(trainer.rollout_generator(x_t, sigma, labels), trainer.generator(x_t, sigma, labels),
                                       rtol=2e-2, atol=2e-2)
    assert not torch.equal(to_qkv, before)
    with torch.no_grad():  # the copy holds the generator's weights, in bf16
        want = torch.cat([trainer.generator.net.get_parameter(f"transformer_blocks.0.attn.to_{x}.weight") for x in "qkv"])
        assert torch.equal(to_qkv, want.to(torch.bfloat16))


def test_master_weights_compute_on_bf16_copies_with_autocasts_numbers(sd3_dir, tmp_path):
    """perf.master_weights: the generator and the critic run on bf16 copies (the objective's roles, the
    rollout), MasterAdamW updates their fp32 weights from the copies' gradients, and the copies follow
    them after every update. With a bf16 teacher this is what autocast computes from the fp32 weights, without a
    weight cast per forward: the same losses; and the critic's copy starts as the teacher itself."""
    from fastdmd.distributed import World
    from fastdmd.trainer import Trainer

    def run(*extra):
        cfg = parse_args(args_for(sd3_dir, tmp_path / "_".join(extra or ("autocast",)), "--model.dtype", "bfloat16",
                                  "--perf.mixed_precision", "bf16", "--eval.at_end", "false", *extra))
        return Trainer(cfg, World())

    autocast, master = run(), run("--perf.master_weights", "true")
    copies = (master.generator_compute, master.fake_compute)
    assert master.rollout_generator is master.generator_compute
    assert master.objective.roles.generator is master.generator_compute and master.objective.roles.fake is master.fake_compute
    x_t, sigma, labels = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.3]), torch.tensor([0, 2])
    with torch.no_grad(), master._autocast():
        assert torch.equal(master.fake_compute.predict(x_t, sigma, labels),
                           master.real.eager_predict(x_t, sigma, labels, 1.0)[0])
    for step in (1, 2, 3):
        want, got = autocast.train_step(step), master.train_step(step)
        for key in ("loss_dmd", "loss_critic", "grad_norm_generator"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
    for copy, weights in zip(copies, (master.generator, master.fake)):
        assert {p.dtype for p in weights.parameters()} == {torch.float32}
        assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
        assert all(p.grad is None for p in copy.parameters())
        for c, w in zip(copy.parameters(), weights.parameters()):
            assert torch.equal(c, w.detach().to(torch.bfloat16))
    trained = dict(master.generator.net.named_parameters())["transformer_blocks.0.attn.to_q.weight"]
    initial = dict(master.real.net.named_parameters())["transformer_blocks.0.attn.to_q.weight"]
    assert not torch.equal(trained.detach(), initial.float())  # the updates (lr 5e-7) reached the fp32 weights


def test_master_adamw_updates_as_torch_adamw_on_autocasts_gradients_with_clipping_and_ema(sd3_dir, tmp_path):
    """MasterAdamW's one fused update (bf16 gradients in, clipping coefficient and EMA inside) gives the
    fp32 weights, the EMA and the moments that torch's fused AdamW, clip_grads_with_norm_ and EMA.update give
    on autocast's fp32 gradients; the generator's gradients are clipped here at every update."""
    from fastdmd.distributed import World
    from fastdmd.optim import MasterAdamW
    from fastdmd.trainer import Trainer

    def run(*extra):
        cfg = parse_args(args_for(sd3_dir, tmp_path / "_".join(extra or ("autocast",)), "--model.dtype", "bfloat16",
                                  "--perf.mixed_precision", "bf16", "--eval.at_end", "false", "--trainer.grad_clip",
                                  "1e-3", "--trainer.lr_generator", "1e-3", "--trainer.lr_critic", "1e-3",
                                  "--trainer.ema_decay", "0.9", *extra))
        return Trainer(cfg, World())

    autocast, master = run(), run("--perf.master_weights", "true")
    assert isinstance(master.opt_g, MasterAdamW) and isinstance(master.opt_c, MasterAdamW)
    assert master.optimizer_name.startswith("fastdmd MasterAdamW (reference")
    for step in (1, 2, 3):
        want, got = autocast.train_step(step), master.train_step(step)
        assert got["grad_norm_generator"] > 1e-3  # clipped
        for key in ("loss_dmd", "loss_critic", "grad_norm_generator"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (step, key)
    for a, b in ((autocast.generator, master.generator), (autocast.fake, master.fake)):
        for (name, w), m in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(m, w, rtol=1e-5, atol=1e-6, msg=name)
    for w, m in zip(autocast.ema.shadow, master.ema.shadow):
        torch.testing.assert_close(m, w, rtol=1e-5, atol=1e-6)
    for opt_a, opt_b in ((autocast.opt_g, master.opt_g), (autocast.opt_c, master.opt_c)):
        for p_a, p_b in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
            state_a, state_b = opt_a.state[p_a], opt_b.state[p_b]
            assert float(state_b["step"]) == float(state_a["step"]) == 3.0
            assert "exp_avg" not in state_b  # beta1 = 0: the first moment is the gradient, never read
            torch.testing.assert_close(state_b["exp_avg_sq"], state_a["exp_avg_sq"], rtol=1e-4, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the test's gradient spy
def test_master_weights_with_fused_qkv_train_the_fused_copies_like_separate_ones(sd3_dir, tmp_path):
    """perf.fuse_qkv with perf.master_weights fuses the trained roles' bf16 copies too (one q/k/v matmul,
    forward and backward; the rollout runs on the generator's fused copy): each fp32 q, k or v weight is
    stepped from its rows of the fused weight's gradient, and the fused weight holds the fp32 weights,
    rounded, after every update. The numbers are the separate projections' up to matmul rounding."""
    from fastdmd.distributed import World
    from fastdmd.optim import MasterAdamW
    from fastdmd.trainer import Trainer

    def run(*extra):
        cfg = parse_args(args_for(sd3_dir, tmp_path / "_".join(extra or ("separate",)), "--model.dtype", "bfloat16",
                                  "--perf.mixed_precision", "bf16", "--perf.master_weights", "true",
                                  "--eval.at_end", "false", "--trainer.lr_generator", "1e-3",
                                  "--trainer.lr_critic", "1e-3", *extra))
        return Trainer(cfg, World())

    separate, fused = run(), run("--perf.fuse_qkv", "true")
    assert fused.fused_qkv == "teacher, generator copy, critic copy"
    assert fused.rollout_generator is fused.generator_compute
    names = {n for n, _ in fused.generator_compute.net.named_parameters()}
    assert "transformer_blocks.0.attn.to_qkv.weight" in names and "transformer_blocks.0.attn.to_q.weight" not in names
    assert "transformer_blocks.0.attn.to_q.weight" in {n for n, _ in fused.generator.net.named_parameters()}
    grads = {}
    for trainer in (separate, fused):  # the gradient each fp32 weight is stepped from, at every generator update
        opt, real_step = trainer.opt_g, trainer.opt_g.step

        def step(*args, opt=opt, real_step=real_step, trainer=trainer, **kwargs):
            grads.setdefault(id(trainer), []).append(
                [MasterAdamW.copy_grad(opt.copies[p]).float().clone() for p in opt.param_groups[0]["params"]])
            return real_step(*args, **kwargs)
        opt.step = step
    for step in (1, 2, 3):
        want, got = separate.train_step(step), fused.train_step(step)
        for key in ("loss_dmd", "loss_critic", "grad_norm_generator"):
            assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-6), (step, key)
    # Same gradients, up to the bf16 rounding of differently blocked matmuls (the weights, stepped by Adam from
    # them, drift apart further where a gradient is near zero: Adam's step has the size lr whatever its sign).
    names = [n for n, p in fused.generator.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, grads[id(fused)][0], grads[id(separate)][0]):
        torch.testing.assert_close(g, w, rtol=0, atol=5e-2 * float(w.abs().max()) + 1e-12, msg=name)
    for pairs in (fused._generator_copy, fused._fake_copy):
        for c, w in zip(*pairs):
            assert torch.equal(c, w.detach().to(torch.bfloat16))
    qkv = dict(fused.generator_compute.net.named_parameters())["transformer_blocks.0.attn.to_qkv.weight"]
    k = dict(fused.generator.net.named_parameters())["transformer_blocks.0.attn.to_k.weight"]
    assert torch.equal(qkv[k.shape[0]:2 * k.shape[0]], k.detach().to(torch.bfloat16))
    assert all(p.grad is None for p in fused.generator_compute.parameters())


def test_master_weights_resume_to_the_uninterrupted_run(sd3_dir, tmp_path):
    """A resumed run refills the bf16 copies from the fp32 weights it loads."""
    def rows(run_dir, *extra):
        main(args_for(sd3_dir, run_dir, "--model.dtype", "bfloat16", "--perf.mixed_precision", "bf16",
                      "--perf.master_weights", "true", "--trainer.lr_schedule", "constant", "--eval.at_end", "false",
                      "--trainer.lr_generator", "1e-3", "--trainer.lr_critic", "1e-3", *extra))
        with open(run_dir / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    straight = rows(tmp_path / "straight", "--trainer.steps", "3")
    rows(tmp_path / "cut", "--trainer.steps", "2", "--trainer.checkpoint_every", "2")
    resumed = rows(tmp_path / "cut", "--trainer.steps", "3", "--resume")
    for key in ("loss_dmd", "loss_critic", "grad_norm_generator"):
        assert resumed[2][key] == straight[2][key], key


@pytest.mark.parametrize("written, resumed", [(True, False), (False, True)], ids=["from_master", "to_master"])
def test_a_checkpoint_resumes_across_master_weights(sd3_dir, tmp_path, written, resumed):
    """The optimizer state on disk is torch AdamW's either way: MasterAdamW keeps no exp_avg at beta1 = 0 and
    writes zeros in its place. A run cut at step 2 with perf.master_weights `written` and resumed with
    `resumed` reaches the step 3 of an uninterrupted run in the resuming mode (the two modes' numbers
    agree to about 1e-5 relative, test_master_adamw_updates_as_torch_adamw_on_autocasts_gradients...)."""
    def rows(run_dir, master_weights, *extra):
        main(args_for(sd3_dir, run_dir, "--model.dtype", "bfloat16", "--perf.mixed_precision", "bf16",
                      "--perf.master_weights", str(master_weights).lower(), "--trainer.lr_schedule", "constant",
                      "--eval.at_end", "false", "--trainer.lr_generator", "1e-3", "--trainer.lr_critic", "1e-3",
                      *extra))
        with open(run_dir / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]

    straight = rows(tmp_path / "straight", resumed, "--trainer.steps", "3")
    rows(tmp_path / "cut", written, "--trainer.steps", "2", "--trainer.checkpoint_every", "2")
    if not resumed:  # torch's AdamW keeps its own implementation (fused here), whatever the checkpoint's says
        from fastdmd.distributed import World
        from fastdmd.trainer import Trainer

        cfg = parse_args(args_for(sd3_dir, tmp_path / "cut", "--model.dtype", "bfloat16", "--perf.mixed_precision",
                                  "bf16", "--eval.at_end", "false"))
        trainer = Trainer(cfg, World())
        keys = ("fused", "foreach", "capturable", "differentiable")
        before = [{k: group[k] for k in keys} for group in trainer.opt_g.param_groups]
        trainer.resume()
        assert trainer.step == 2 and before[0]["fused"] is True
        assert [{k: group[k] for k in keys} for group in trainer.opt_g.param_groups] == before
    again = rows(tmp_path / "cut", resumed, "--trainer.steps", "3", "--resume")
    for key in ("loss_dmd", "loss_critic", "grad_norm_generator"):
        assert again[2][key] == pytest.approx(straight[2][key], rel=1e-4), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_bf16_rollout_copy_in_cuda_graphs_follows_the_generator(sd3_dir, tmp_path):
    """The optimized variant's rollout on SD3: fused q/k/v, bf16 copy, replayed from CUDA graphs, with
    the copy rewritten in place after every step; its output stays the generator's own."""
    from fastdmd.distributed import World
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import Trainer, step_generator

    dev = torch.device("cuda")
    cfg = parse_args(args_for(sd3_dir, tmp_path / "run", "--perf.fuse_qkv", "true", "--perf.mixed_precision", "bf16",
                              "--perf.rollout_weights", "bf16", "--perf.cuda_graph_rollout", "true",
                              "--perf.cuda_graph_scores", "true", "--trainer.lr_generator", "1e-2"))
    trainer = Trainer(cfg, World(device=dev))
    assert trainer.rollout.active and trainer.fused_qkv == "teacher, rollout copy"
    for step in range(1, 4):
        trainer.train_step(step)
        noise = torch.randn(2, 4, 8, 8, device=dev)
        labels = torch.tensor([0, 2], device=dev)
        with trainer._autocast():
            got = trainer.rollout(noise, labels, 3, step_generator(0, 0, step, dev))
            want = backward_simulation(trainer.generator, noise, labels, cfg.dmd.generator_sigmas, 3,
                                       step_generator(0, 0, step, dev))
        torch.testing.assert_close(got[0], want[0], rtol=3e-2, atol=3e-2)


def test_dmdr_with_a_clip_reward_on_decoded_latents(sd3_dir, tmp_path):
    """A reward method on SD3: the LoRA critic on the transformer's attention, PickScore (a tiny random
    CLIP) scoring the VAE-decoded samples against the run's prompts, its gradient back to the generator."""
    from test_rewards_clip import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    main(args_for(sd3_dir, tmp_path / "run", "--method", "dmdr", "--reward.names", "pickscore",
                  "--reward.pickscore_path", clip, "--reward.dtype", "float32", "--dmdr.cold_start", "0",
                  "--dmdr.lora_rank", "2", "--trainer.steps", "2", "--eval.at_end", "false"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert all(r["reward_on"] == 1 and torch.isfinite(torch.tensor(r["reward"])) for r in rows)
    assert all(r["skipped_generator_updates"] == 0 and r["grad_norm_generator"] > 0 for r in rows)


def test_export_writes_a_pipeline_directory_with_the_trained_transformer(sd3_dir, tmp_path):
    from fastdmd.export import main as export_main
    from fastdmd.runs import load_run_generator

    main(args_for(sd3_dir, tmp_path / "run", "--trainer.steps", "2", "--eval.at_end", "false",
                  "--trainer.lr_generator", "1e-3"))
    export_main([str(tmp_path / "run"), str(tmp_path / "out")])
    out = tmp_path / "out"
    assert (out / "vae" / "config.json").exists() and (out / "scheduler" / "scheduler_config.json").exists()
    # Without model_index.json, StableDiffusion3Pipeline's components: not the prompt file or cache beside them.
    assert sorted(os.listdir(out)) == ["fastdmd.json", "scheduler", "transformer", "vae"]
    meta = json.loads((out / "fastdmd.json").read_text())
    assert meta["family"] == "sd3" and "null_label" not in meta and "num_classes" not in meta
    exported = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    trained = load_run_generator(str(tmp_path / "run")).net
    teacher = SD3Transformer2DModel.from_pretrained(sd3_dir, subfolder="transformer")
    for (name, a), b, c in zip(exported.state_dict().items(), trained.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(exported.state_dict().values(), teacher.state_dict().values()))


def _teacher_copy(sd3_dir, root):
    """A teacher directory the test may change: sd3_dir's files in `root`."""
    import shutil

    shutil.copytree(sd3_dir, root)
    return root


def test_a_bf16_export_copies_the_pipelines_folders_only_and_initialises_a_generator(sd3_dir, tmp_path, capsys):
    """A teacher directory with model_index.json and stray files beside the pipeline (a single-file checkpoint,
    a folder model_index.json does not list): the export copies model_index.json and the folders it lists, and
    saves the transformer in the run's model.dtype; that export then starts another run's generator."""
    from safetensors import safe_open

    from fastdmd.distributed import World
    from fastdmd.export import main as export_main
    from fastdmd.generate import load_generator
    from fastdmd.runs import load_run_generator
    from fastdmd.trainer import Trainer

    teacher = _teacher_copy(sd3_dir, tmp_path / "teacher")
    (teacher / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None]}))
    (teacher / "sd3_medium.safetensors").write_bytes(b"\0" * 1024)
    (teacher / "notes").mkdir()
    run, out = tmp_path / "run", tmp_path / "out"
    main(args_for(teacher, run, "--trainer.steps", "2", "--eval.at_end", "false", "--trainer.lr_generator", "1e-3",
                  "--model.dtype", "bfloat16"))
    capsys.readouterr()
    export_main([str(run), str(out)])
    assert "(bfloat16, the trained fp32 weights cast to the run's model.dtype)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["fastdmd.json", "model_index.json", "scheduler", "transformer", "vae"]
    assert json.loads((out / "model_index.json").read_text()) == json.loads((teacher / "model_index.json").read_text())
    trained = load_run_generator(str(run)).net.state_dict()
    sampled = load_generator(str(run)).net.state_dict()  # `generate RUN` samples what the export holds
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(trained)
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), trained[name].to(torch.bfloat16)), name
            assert torch.equal(f.get_tensor(name), sampled[name]), name

    initialised = Trainer(parse_args(args_for(teacher, tmp_path / "next", "--model.init_generator", str(out))), World())
    for name, weight in initialised.generator.net.state_dict().items():
        assert weight.dtype == torch.float32 and torch.equal(weight, trained[name].to(torch.bfloat16).float()), name


def test_an_export_of_another_shape_is_refused_as_init_generator(sd3_dir, tmp_path):
    from fastdmd.distributed import World
    from fastdmd.export import main as export_main
    from fastdmd.runs import UsageError
    from fastdmd.trainer import Trainer

    main(args_for(sd3_dir, tmp_path / "run", "--trainer.steps", "1", "--eval.at_end", "false"))
    out = tmp_path / "out"
    export_main([str(tmp_path / "run"), str(out)])
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
                          pooled_projection_dim=POOLED_DIM, pos_embed_max_size=8).save_pretrained(out / "transformer")
    cfg = parse_args(args_for(sd3_dir, tmp_path / "next", "--model.init_generator", str(out)))
    with pytest.raises(UsageError, match=f"model.init_generator {out}: its weights do not fit this run's sd3 generator"):
        Trainer(cfg, World())


def test_export_into_the_teacher_or_run_directory_is_refused_with_one_line(sd3_dir, tmp_path, capsys):
    from fastdmd.export import main as export_main

    teacher = _teacher_copy(sd3_dir, tmp_path / "teacher")
    run = tmp_path / "run"
    main(args_for(teacher, run, "--trainer.steps", "1", "--eval.at_end", "false"))
    before = sorted(str(p.relative_to(teacher)) for p in teacher.rglob("*"))
    capsys.readouterr()
    for out, message in [(teacher, f"output {teacher} is the run's teacher directory {teacher}, whose pipeline"),
                         (teacher / "student", f"output {teacher / 'student'} is inside the run's teacher directory"),
                         (run, f"output {run} is the run directory; give another folder, e.g. {run / 'export'}")]:
        with pytest.raises(SystemExit) as done:
            export_main([str(run), str(out)])
        err = capsys.readouterr().err.strip()
        assert done.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert sorted(str(p.relative_to(teacher)) for p in teacher.rglob("*")) == before
    assert not os.path.exists(run / "fastdmd.json")


@pytest.mark.parametrize("cache", ["given", "default"])
def test_generate_draws_the_prompts_the_run_trained_on_after_its_prompt_file_changes(sd3_dir, tmp_path, monkeypatch,
                                                                                    cache):
    """The run's prompt cache lists the prompts the run trained on; generate takes them from there, not from the
    prompt file, which may have been edited or removed since. The default cache, named after the prompts,
    is found through the path the run's config.json records."""
    import shutil

    from fastdmd.generate import load_generator, main as generate_main, sample_prompts
    from fastdmd.models.prompts import default_cache_path

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "run"
    extra = []
    if cache == "default":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        default = default_cache_path(str(sd3_dir), PROMPTS, 256)  # the recipe's max_sequence_length
        os.makedirs(os.path.dirname(default))
        shutil.copyfile(sd3_dir / CACHE, default)
        extra = ["--model.prompt_cache", ""]
    main(args_for(sd3_dir, run, "--trainer.steps", "1", "--eval.at_end", "false", "--model.prompts", str(prompt_file),
                  *extra))
    if cache == "default":
        assert json.loads((run / "config.json").read_text())["model"]["prompt_cache"] == default
    gen = load_generator(str(run))
    before, _ = sample_prompts(gen, [PROMPTS[1]], 2, list(gen.sigmas), seed=3)
    prompt_file.write_text("a yellow star\n" + "\n".join(reversed(PROMPTS)) + "\n")
    edited, _ = sample_prompts(gen, [PROMPTS[1]], 2, list(gen.sigmas), seed=3)
    torch.testing.assert_close(edited, before, rtol=0, atol=0)
    assert len(generate_main([str(run), "--prompt", PROMPTS[1], "--num", "1", "--out", str(tmp_path / "png")])) == 2
    prompt_file.unlink()
    removed, _ = sample_prompts(gen, [PROMPTS[1]], 2, list(gen.sigmas), seed=3)
    torch.testing.assert_close(removed, before, rtol=0, atol=0)


@pytest.mark.parametrize("t5", [True, False], ids=["clip+t5", "clip-only"])
def test_the_prompt_cache_is_what_the_pipelines_encode_prompt_gives(sd3_pipeline_dir, tmp_path, t5):
    """With no cache the text encoders, loaded folder by folder, encode the prompts and the empty one,
    as StableDiffusion3Pipeline.encode_prompt does; without text_encoder_3 (SD3 without T5) the T5
    part is zeros, as in diffusers. The second load reads the cache and no encoder."""
    import shutil

    from diffusers import StableDiffusion3Pipeline

    root = tmp_path / "model"
    shutil.copytree(sd3_pipeline_dir, root, ignore=None if t5 else shutil.ignore_patterns("*_3"))
    cfg = parse_args(["--recipe", "sd3-dmd2", "--model.path", str(root), "--model.prompts", str(root / "prompts.txt"),
                      "--model.prompt_cache", str(tmp_path / "cache.safetensors"), "--model.max_sequence_length", "9",
                      "--model.resolution", "0"])  # the tiny transformer's own sample_size: the recipe's 1024 is too big
    family = load_family(cfg.model)
    reference = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline_dir, local_files_only=True, vae=None,
                                                         **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    embeds, _, pooled, _ = reference.encode_prompt(prompt=PROMPTS + [""], prompt_2=None, prompt_3=None,
                                                   do_classifier_free_guidance=False, max_sequence_length=9)
    assert family.adapter.prompt_embeds.shape == (len(PROMPTS) + 1, 77 + 9, JOINT_DIM)
    torch.testing.assert_close(family.adapter.prompt_embeds, embeds.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(family.adapter.pooled, pooled.float(), rtol=0, atol=1e-6)
    assert (family.adapter.prompt_embeds[:, 77:].abs().sum() > 0) == t5
    assert not torch.equal(family.adapter.prompt_embeds[0], family.adapter.prompt_embeds[1])
    for folder in root.glob("text_encoder*"):
        shutil.rmtree(folder)
    torch.testing.assert_close(load_family(cfg.model).adapter.prompt_embeds, family.adapter.prompt_embeds, rtol=0, atol=0)


def test_a_downloaded_pipeline_trains_and_draws_new_prompts(sd3_pipeline_dir, tmp_path, monkeypatch):
    """The user's path end to end: no prompt cache given (it goes to XDG_CACHE_HOME), the text
    encoders build it, a step trains; fastdmd.generate then encodes a prompt the run never saw."""
    from fastdmd.generate import main as generate_main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = args_for(sd3_pipeline_dir, tmp_path / "run", "--trainer.steps", "1", "--eval.at_end", "false")
    args[args.index("--model.prompt_cache") + 1] = ""
    main(args)
    assert len(list((tmp_path / "xdg" / "fastdmd" / "prompts").glob("*.safetensors"))) == 1
    paths = generate_main([str(tmp_path / "run"), "--prompt", "a purple hexagon", "--num", "1",
                           "--out", str(tmp_path / "png")])
    assert [os.path.basename(p) for p in paths] == ["grid.png", "prompt0_000.png"]


def test_generate_draws_the_runs_prompts_as_rgb_images(sd3_dir, tmp_path, capsys):
    from fastdmd.generate import main as generate_main

    main(args_for(sd3_dir, tmp_path / "run", "--trainer.steps", "1", "--eval.at_end", "false"))
    paths = generate_main([str(tmp_path / "run"), "--prompt", PROMPTS[1], "--num", "2", "--out", str(tmp_path / "png")])
    assert [os.path.basename(p) for p in paths] == ["grid.png", "prompt0_000.png", "prompt0_001.png"]
    import matplotlib.image
    assert matplotlib.image.imread(paths[1]).shape[:2] == (16, 16)  # decoded by the tiny VAE (2x)
    with pytest.raises(SystemExit):  # a prompt the run never saw needs the text encoders, which this dir lacks
        generate_main([str(tmp_path / "run"), "--prompt", "a purple hexagon", "--out", str(tmp_path / "png2")])
    err = capsys.readouterr().err
    assert f"--prompt 'a purple hexagon' is not one of the run's prompts {PROMPTS}" in err and "text_encoder" in err
    assert "model.prompt_cache" not in err  # an option of training, not of generate
    with pytest.raises(SystemExit) as done:
        generate_main([str(tmp_path / "run"), "--prompt", " ", "--out", str(tmp_path / "png3")])
    assert done.value.code == 2 and "--prompt is empty" in capsys.readouterr().err
    paths = generate_main([str(tmp_path / "run"), "--prompt", f" {PROMPTS[1]} ", "--num", "1", "--out", str(tmp_path / "png4")])
    assert len(paths) == 2  # surrounding blanks dropped, as in the prompt file: a trained prompt, no text encoder


def test_the_exported_directory_runs_in_diffusers_sd3_pipeline_as_fastdmd_generate_does(sd3_dir, tmp_path):
    """StableDiffusion3Pipeline built from the export (transformer, VAE, few-step scheduler; the prompt
    embeddings given directly since the tiny directory has no text encoders) at num_inference_steps=4,
    guidance 1: the same images as `fastdmd.generate RUN --prompt` with the same seed."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from fastdmd.export import main as export_main
    from fastdmd.generate import load_generator, sample_prompts
    from fastdmd.models.prompts import load_prompt_cache
    from tiny_pipeline import CACHE

    run = tmp_path / "run"
    main(args_for(sd3_dir, run, "--trainer.steps", "2", "--eval.at_end", "false", "--trainer.lr_generator", "1e-3"))
    export_main([str(run), str(tmp_path / "out")])
    out = tmp_path / "out"
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(out, subfolder="transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(out, subfolder="vae"),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    meta = json.loads((out / "fastdmd.json").read_text())
    sigmas = meta["generator_sigmas"]  # the sd3 recipe's 0.999, ...: not a num_inference_steps config
    assert f"pass sigmas={sigmas}" in meta["scheduler"]
    embeds, pooled = load_prompt_cache(str(sd3_dir / CACHE), PROMPTS)
    # The pipeline calls scheduler.step without its generator, so the re-noise draws come from torch's
    # global stream: seeding that one (and no generator) gives fastdmd.generate's single stream.
    torch.manual_seed(3)
    images = pipe(prompt_embeds=embeds[1:2].repeat(2, 1, 1), pooled_prompt_embeds=pooled[1:2].repeat(2, 1),
                  sigmas=sigmas, guidance_scale=1.0, height=16, width=16, output_type="pt").images
    ours, _ = sample_prompts(load_generator(str(run)), [PROMPTS[1]], 2, sigmas, seed=3)
    torch.testing.assert_close(images * 2 - 1, ours, rtol=1e-4, atol=1e-4)
    from_export, _ = sample_prompts(load_generator(str(out)), [PROMPTS[1]], 2, sigmas, seed=3)  # generate OUT
    torch.testing.assert_close(from_export, ours, rtol=1e-5, atol=1e-5)


def test_fsdp_bf16_policy_keeps_the_diffusion_time_in_fp32():
    """Under torchrun's bf16 policy the network's inputs go to bf16 but its time stays fp32: cast with
    the rest, SD3's t = 749 would reach the time embedding as 748 (bf16's step there is 4)."""
    import torch.distributed as dist

    from fastdmd.config import PerfConfig
    from fastdmd.distributed import World, parallelize

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                    caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=8)
        parallelize(net, World(rank=0, world_size=2), PerfConfig(mixed_precision="bf16"))  # "torchrun" on one rank
        seen = {}
        net.time_text_embed.register_forward_pre_hook(lambda m, args: seen.update(t=args[0], pooled=args[1]))
        net.pos_embed.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
        with torch.no_grad():
            out = net(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, TOKENS, JOINT_DIM),
                      pooled_projections=torch.randn(2, POOLED_DIM), timestep=torch.tensor([749.0, 999.0])).sample
    finally:
        dist.destroy_process_group()
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [749.0, 999.0]
    assert seen["x"].dtype == seen["pooled"].dtype == out.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fuse_qkv", ["false", "true"], ids=["separate_qkv", "fused_qkv"])
def test_master_weights_copies_in_cuda_graphs_follow_the_fp32_weights(sd3_dir, tmp_path, fuse_qkv):
    """perf.master_weights with the rollout and score graphs: the graphs, captured before training,
    read the bf16 copies in place; after steps that update the fp32 weights (MasterAdamW's Triton update
    writes the copies in place) they replay what the copies compute eagerly, and each copy holds its
    fp32 weight rounded to nearest."""
    from fastdmd.distributed import World
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import Trainer, step_generator

    dev = torch.device("cuda")
    cfg = parse_args(args_for(sd3_dir, tmp_path / "run", "--model.dtype", "bfloat16", "--perf.mixed_precision", "bf16",
                              "--perf.master_weights", "true", "--perf.cuda_graph_rollout", "true",
                              "--perf.cuda_graph_scores", "true", "--trainer.lr_generator", "1e-2",
                              "--trainer.lr_critic", "1e-2", "--perf.fuse_qkv", fuse_qkv))
    trainer = Trainer(cfg, World(device=dev))
    assert trainer.rollout.active and trainer.scores_graphs == "CUDA graph"
    assert trainer.optimizer_name.startswith("fastdmd MasterAdamW (triton")
    labels = torch.tensor([0, 2], device=dev)
    for step in range(1, 4):
        trainer.train_step(step)
        noise, x_t = torch.randn(2, 4, 8, 8, device=dev), torch.randn(2, 4, 8, 8, device=dev)
        sigma = torch.tensor([0.9, 0.3], device=dev)
        with torch.no_grad(), trainer._autocast():
            got = trainer.rollout(noise, labels, 3, step_generator(0, 0, step, dev))
            want = backward_simulation(trainer.generator_compute, noise, labels, cfg.dmd.generator_sigmas, 3,
                                       step_generator(0, 0, step, dev))
            torch.testing.assert_close(got[0], want[0], rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(trainer.fake_compute.predict(x_t, sigma, labels),
                                       trainer.fake_compute.eager_predict(x_t, sigma, labels), rtol=3e-2, atol=3e-2)
    for pairs in (trainer._generator_copy, trainer._fake_copy):  # by name: q/k/v are rows of fused weights
        for c, w in zip(*pairs):
            assert torch.equal(c, w.detach().to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_overhead_with_master_weights_trains_as_the_default_compile_mode(sd3_dir, tmp_path):
    """step_throughput's optimized step on CUDA: torch.compile's reduce-overhead mode with perf.master_weights.
    The bf16 copies' gradients come out of the cudagraph trees' memory, and MasterAdamW reads them after
    the backward and writes the copies in place between replays; the DMD scores and the rollout replay
    whole-call graphs of the blocks' default-mode twins: three steps give the losses and fp32 weights of
    the default mode (the same compiled kernels, its own whole-call graphs for the scores and rollout)."""
    from fastdmd.distributed import World
    from fastdmd.trainer import Trainer

    def run(mode: str):
        cfg = parse_args(args_for(sd3_dir, tmp_path / mode, "--model.dtype", "bfloat16", "--perf.mixed_precision", "bf16",
                                  "--perf.master_weights", "true", "--perf.fuse_qkv", "true", "--perf.compile", "true",
                                  "--perf.compile_mode", mode, "--perf.cuda_graph_rollout", "true",
                                  "--perf.cuda_graph_scores", "true", "--trainer.lr_generator", "1e-2",
                                  "--trainer.lr_critic", "1e-2"))
        trainer = Trainer(cfg, World(device=torch.device("cuda")))
        logs = [trainer.train_step(step) for step in range(1, 4)]
        assert trainer.rollout.active and len(trainer.real.graphs) > 0 and len(trainer.fake_compute.graphs) > 0
        return trainer, logs, [p.detach().clone() for p in trainer.generator.net.parameters()]

    from torch._dynamo.utils import counters

    default, default_logs, default_weights = run("default")
    skips = counters["inductor"]["cudagraph_skips"]
    graphs, graphs_logs, graphs_weights = run("reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] == skips  # every compiled block replayed from CUDA graphs
    assert graphs.optimizer_name.startswith("fastdmd MasterAdamW (triton")
    for want, got in zip(default_logs, graphs_logs):
        for key in ("loss_generator", "loss_critic", "grad_norm_generator"):
            assert math.isfinite(got[key]) and got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), key
    for want, got in zip(default_weights, graphs_weights):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_fsdp2_on_one_rank_of_the_devices_backend_resumes_as_an_uninterrupted_run(sd3_dir, tmp_path, monkeypatch,
                                                                                  capsys, device):
    """`torchrun -m fastdmd.train`'s FSDP2 path on one rank (tiny_pipeline.one_rank_fsdp): the process group of
    the device (cpu:gloo,cuda:nccl on a GPU), every network sharded (DTensor parameters, torch's fused AdamW on
    them), the bf16 policy, activation checkpointing, per-block torch.compile on CUDA, a DCP checkpoint at step 2
    and a resume to step 3. The 2-rank tests run gloo on CPU. CPU: every logged value as the uninterrupted
    run's, bit for bit; CUDA: up to rounding (atomics in the attention backward, README "Determinism")."""
    import torch.distributed as dist

    sharded = one_rank_fsdp(monkeypatch, device)
    common = ["--trainer.lr_schedule", "constant", "--eval.at_end", "false", "--trainer.checkpoint_every", "2",
              "--perf.mixed_precision", "bf16", "--perf.activation_checkpointing", "true",
              "--perf.compile", "true" if device == "cuda" else "false"]

    def rows(run_dir, *extra):
        main(args_for(sd3_dir, run_dir, *common, *extra))
        assert not dist.is_initialized()  # the run's own shutdown destroyed the group
        return metrics_rows(run_dir)

    straight = rows(tmp_path / "straight", "--trainer.steps", "3")
    # teacher, generator, critic: each network's 2 blocks, then the network
    assert sum(isinstance(m, SD3Transformer2DModel) for m in sharded) == 3 and len(sharded) == 9
    header = capsys.readouterr().out
    assert f"device={device}" in header and "weights: read by rank 0 alone" in header
    assert "activation_checkpointing=per block precision=bf16" in header
    assert ("compile=per block (inductor)" if common[-1] == "true" else "compile=off") in header
    rows(tmp_path / "cut", "--trainer.steps", "2")
    again = rows(tmp_path / "cut", "--trainer.steps", "3", "--resume")
    assert [r["step"] for r in again] == [1, 2, 3] and all(math.isfinite(r["loss_dmd"]) for r in again)
    if device == "cpu":
        assert again == straight
    else:
        for want, got in zip(straight, again):
            for key in ("loss_dmd", "loss_critic", "grad_norm_generator"):
                assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), (got["step"], key)
