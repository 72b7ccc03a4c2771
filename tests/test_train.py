"""End-to-end runs of the trainer on the shipped digits assets, small enough for CI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastdmd.trainer import step_generator
from fastdmd.train import main

TINY = ["--trainer.batch_size", "8", "--trainer.log_every", "1", "--trainer.sample_every", "0",
        "--trainer.warmup_steps", "2", "--eval.at_end", "false"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(rows):
    return [(r["step"], r["loss_dmd"], r["loss_critic"], r["grad_norm_generator"]) for r in rows]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    main(TINY + ["--trainer.steps", "4", "--run_dir", full])
    main(TINY + ["--trainer.steps", "2", "--run_dir", part])
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["step_0000002"]
    main(["--resume", "--run_dir", part, "--trainer.steps", "4"])
    assert losses(read_metrics(part)) == losses(read_metrics(full))  # bitwise on CPU


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        main(TINY + ["--resume", "--run_dir", str(tmp_path), "--trainer.steps", "2"])


def test_each_rank_and_step_draws_its_own_numbers():
    draws = {(r, s): torch.randn(4, generator=step_generator(0, r, s)) for r in range(2) for s in range(2)}
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])
    assert torch.equal(draws[(1, 1)], torch.randn(4, generator=step_generator(0, 1, 1)))


@pytest.mark.distributed
def test_torchrun_two_ranks_on_gloo(tmp_path):
    run_dir = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "fastdmd.train", *TINY, "--trainer.steps", "4", "--trainer.checkpoint_every", "2",
           "--run_dir", run_dir, "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes
    assert proc.stdout.count("fastdmd digits-dmd2:") == 1
    assert "x2 ranks" in proc.stdout
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_0000002", "step_0000004"]
    # Resume under torchrun too, to one more step.
    cmd_resume = cmd[:5] + ["--resume", "--run_dir", run_dir, "--trainer.steps", "5"]
    proc = subprocess.run(cmd_resume, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
