"""Export of a run's generator as a diffusers directory (fastdmd.export) through the shared run loader
(fastdmd.runs): what from_pretrained loads back is exactly what the trainer evaluates."""

import json
import os
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from fastdmd.checkpoint import latest_checkpoint, load_checkpoint
from fastdmd.distributed import World
from fastdmd.export import main
from fastdmd.models.digits import DigitsFlowAdapter
from fastdmd.roles import Generator
from fastdmd.runs import read_run_config
from fastdmd.train import main as train
from fastdmd.trainer import Trainer

# A large first step (no warm-up) so that the EMA, the raw generator and the teacher all differ bitwise.
TINY = ["--trainer.steps", "2", "--trainer.batch_size", "4", "--trainer.sample_every", "0", "--eval.at_end", "false",
        "--trainer.warmup_steps", "0", "--trainer.lr_generator", "1e-3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: one keeps an EMA of the generator (the default), one does not."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {"ema": str(root / "ema"), "raw": str(root / "raw")}
    train(TINY + ["--run_dir", dirs["ema"]])
    train(TINY + ["--trainer.ema_decay", "0", "--run_dir", dirs["raw"]])
    return dirs


def trainer_at_latest_checkpoint(run_dir: str) -> Trainer:
    trainer = Trainer(read_run_config(run_dir), World())
    load_checkpoint(latest_checkpoint(run_dir), trainer.checkpoint_state(), World())
    return trainer


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_export_loads_back_bitwise_equal_to_the_trainers_generator(runs, weights, tmp_path, capsys):
    out = tmp_path / "export"
    main([runs[weights], str(out)])
    assert ("exported EMA weights" if weights == "ema" else "exported raw generator weights") in capsys.readouterr().out

    exported = Generator(UNet2DModel.from_pretrained(out / "unet", low_cpu_mem_usage=False), DigitsFlowAdapter())
    trainer = trainer_at_latest_checkpoint(runs[weights])
    g = torch.Generator().manual_seed(0)
    x, sigma, labels = torch.randn((6, 1, 16, 16), generator=g), torch.rand(6, generator=g), torch.arange(6)
    with torch.no_grad():
        y = exported(x, sigma, labels)
        raw = trainer.generator(x, sigma, labels)
        if trainer.ema is not None:
            trainer.ema.swap(trainer.generator)  # the trainer's own way of putting its EMA weights in place
        assert torch.equal(y, trainer.generator(x, sigma, labels))
        assert torch.equal(y, raw) == (weights == "raw")  # EMA and raw weights are told apart

    assert os.path.exists(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler").config.num_train_timesteps == 1000
    meta = json.loads((out / "fastdmd.json").read_text())
    assert meta["generator_sigmas"] == [1.0, 0.75, 0.5, 0.25]
    assert (meta["weights"], meta["step"], meta["null_label"], meta["guidance_scale"]) == (weights, 2, 10, 1.0)
    assert meta["checkpoint"] == os.path.abspath(latest_checkpoint(runs[weights]))


def _config_only(runs, tmp_path):
    path = tmp_path / "config_only"
    path.mkdir()
    shutil.copy(os.path.join(runs["ema"], "config.json"), path)
    os.makedirs(path / "checkpoints" / "step_0000002.tmp")  # an interrupted save does not count
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("missing", ["does not exist", "expected a folder written by `python -m fastdmd.train`"]),
    ("file", ["is a file", "expected a folder"]),
    ("empty", ["is not a fastdmd run directory", "config.json is missing"]),
    ("config_only", ["no complete checkpoint in", "expected a step_XXXXXXX folder with a meta.json"]),
])
def test_bad_run_dir_fails_with_one_clear_message(runs, tmp_path, capsys, case, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a run")
    run_dir = _config_only(runs, tmp_path) if case == "config_only" else str(tmp_path / case)
    with pytest.raises(SystemExit) as exit_info:
        main([run_dir, str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastdmd.export: error: ") and len(err.splitlines()) == 1
    assert run_dir in err and all(text in err for text in expected), err
    assert not os.path.exists(tmp_path / "out")


def test_output_that_is_a_file_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("")
    with pytest.raises(SystemExit):
        main([runs["ema"], str(out)])
    assert f"output {out} is a file; expected a directory" in capsys.readouterr().err


def test_a_plain_diffusers_loop_over_the_exported_scheduler_reproduces_fastdmd_generate(runs, tmp_path):
    """What a diffusers user writes: UNet2DModel + the exported scheduler at num_inference_steps=4,
    scheduler.step per timestep with a seeded generator; the same seed gives fastdmd.generate's samples."""
    from fastdmd.generate import load_generator, sample

    out = tmp_path / "export"
    main([runs["ema"], str(out)])
    unet = UNet2DModel.from_pretrained(out / "unet", low_cpu_mem_usage=False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.stochastic_sampling and scheduler.config.shift == 1.0
    scheduler.set_timesteps(4)
    assert scheduler.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]

    labels = torch.tensor([3, 7])
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, 1, 16, 16), generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = unet(x, t.expand(2), class_labels=labels).sample
            x = scheduler.step(v, t, x, generator=g).prev_sample
    ours, _ = sample(load_generator(str(out)), [3, 7], num=1, sigmas=[1.0, 0.75, 0.5, 0.25], seed=5)
    torch.testing.assert_close(x, ours, rtol=1e-5, atol=1e-5)
    # other sigmas cannot be a 4-step config: the export says to pass them
    from fastdmd.export import few_step_scheduler, scheduler_usage
    odd = (1.0, 0.6, 0.3, 0.1)
    assert "pass sigmas=[1.0, 0.6, 0.3, 0.1]" in scheduler_usage(few_step_scheduler(odd), odd)
