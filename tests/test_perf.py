"""The performance switches (config `perf`): each changes how a step runs, not what it computes."""

import json
import os

import pytest
import torch

from fastdmd.config import parse_args
from fastdmd.distributed import World, blocks_of
from fastdmd.train import main
from fastdmd.trainer import Trainer

TINY = ["--trainer.batch_size", "8", "--trainer.log_every", "1", "--trainer.sample_every", "0",
        "--trainer.warmup_steps", "0", "--trainer.lr_schedule", "constant", "--trainer.lr_generator", "1e-3",
        "--eval.at_end", "false", "--threads", "1", "--trainer.steps", "3"]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["loss_dmd"], r["loss_critic"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    run = tmp_path_factory.mktemp("plain")
    main(TINY + ["--run_dir", str(run)])
    return losses(run)


def test_activation_checkpointing_recomputes_the_same_numbers(tmp_path, plain):
    main(TINY + ["--run_dir", str(tmp_path), "--perf.activation_checkpointing", "true"])
    assert losses(tmp_path) == plain


def test_per_block_compile_wraps_every_block_and_keeps_the_losses(tmp_path, plain):
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.compile", "true", "--perf.compile_backend", "aot_eager"])
    trainer = Trainer(cfg, World())
    for net in (trainer.generator.net, trainer.fake.net, trainer.real.net):
        assert all(block._compiled_call_impl is not None for block in blocks_of(net))
    main(TINY + ["--run_dir", str(tmp_path / "run"), "--perf.compile", "true", "--perf.compile_backend", "aot_eager"])
    for got, want in zip(losses(tmp_path / "run"), plain):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_bf16_autocast_runs_the_forwards_in_bf16(tmp_path, plain, monkeypatch):
    seen = []
    from fastdmd import ops
    real_op = ops.dmd_target
    monkeypatch.setattr(ops, "dmd_target", lambda x0, x_t, real_cond, *a, **kw:
                        (seen.append(real_cond.dtype), real_op(x0, x_t, real_cond, *a, **kw))[1])
    main(TINY + ["--run_dir", str(tmp_path), "--perf.mixed_precision", "bf16"])
    assert set(seen) == {torch.bfloat16}
    got = losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(g)).all() for g in got) and got != plain


def test_missing_accelerators_fall_back_and_say_so(tmp_path, capsys):
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.attention", "flash", "--perf.optimizer", "apex"])
    trainer = Trainer(cfg, World())
    assert trainer.attention.startswith("torch SDPA (")
    assert "apex FusedAdam" in trainer.optimizer_name and trainer.optimizer_name.endswith("torch AdamW (fused)")
    assert trainer.opt_g.defaults["fused"] is True
    naive = Trainer(parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.fused_optimizer", "false"]), World())
    assert naive.optimizer_name == "torch AdamW (default)" and not naive.opt_g.defaults["fused"]
