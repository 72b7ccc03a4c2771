"""Fault injection: NaNs in the teacher, the loss and the gradients; SIGTERM mid-run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdmd import ops
from fastdmd.roles import RealScore
from fastdmd.train import main
from fastdmd.trainer import NonFiniteError

TINY = ["--trainer.batch_size", "8", "--trainer.log_every", "1", "--trainer.sample_every", "0",
        "--trainer.warmup_steps", "0", "--eval.at_end", "false"]


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_nan_teacher_output_is_zeroed_and_counted(tmp_path, monkeypatch):
    real_predict = RealScore.predict

    def poisoned(self, x_t, sigma, labels, g):
        cond, uncond = real_predict(self, x_t, sigma, labels, g)
        cond = cond.clone()
        cond[0].fill_(float("nan"))  # one sample of every batch
        return cond, uncond

    monkeypatch.setattr(RealScore, "predict", poisoned)
    main(TINY + ["--trainer.steps", "3", "--run_dir", str(tmp_path)])
    log = rows(tmp_path)
    assert [r["nonfinite_teacher_samples"] for r in log] == [1.0, 1.0, 1.0]
    assert all(r["skipped_generator_updates"] == 0 for r in log)  # the healthy samples still train
    assert all(torch.isfinite(torch.tensor(r["loss_dmd"])) for r in log)


def _poison_loss(monkeypatch, bad_steps):
    calls = {"n": 0}
    real_op = ops.dmd_target

    def op(*args, **kwargs):
        calls["n"] += 1
        out = real_op(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] in bad_steps else out

    monkeypatch.setattr(ops, "dmd_target", op)


def test_nan_loss_skips_the_update_without_touching_optimizer_state(tmp_path, monkeypatch):
    from fastdmd import trainer as trainer_mod

    seen = {}
    real_step = trainer_mod.Trainer._step_if_finite

    def spy(self, role, loss, grad_norm, opt, step):
        if role == "generator":
            before = [p.detach().clone() for p in self.generator.parameters()]
            state = {k: v.clone() for k, v in opt.state[next(iter(self.generator.parameters()))].items()} \
                if opt.state else {}
            skipped = real_step(self, role, loss, grad_norm, opt, step)
            after = list(self.generator.parameters())
            seen[step] = (skipped, all(torch.equal(a, b) for a, b in zip(before, after)), state,
                          {k: v.clone() for k, v in opt.state[after[0]].items()} if opt.state else {})
            return skipped
        return real_step(self, role, loss, grad_norm, opt, step)

    monkeypatch.setattr(trainer_mod.Trainer, "_step_if_finite", spy)
    _poison_loss(monkeypatch, bad_steps={2})
    main(TINY + ["--trainer.steps", "3", "--run_dir", str(tmp_path)])
    skipped, unchanged, state_before, state_after = seen[2]
    assert skipped and unchanged
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    # Step 1 has a zero DMD gradient (the critic starts as the teacher and g = 1); step 3 does not.
    assert not seen[3][0] and not seen[3][1]  # a healthy step does move the weights
    assert [r["skipped_generator_updates"] for r in rows(tmp_path)] == [0.0, 1.0, 0.0]


def test_consecutive_bad_steps_stop_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, bad_steps=set(range(3, 100)))
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as err:
        main(TINY + ["--trainer.steps", "50", "--trainer.checkpoint_every", "2", "--trainer.max_bad_steps", "3",
                     "--run_dir", str(tmp_path)])
    # Steps 3-5 were skipped, so the checkpoint at step 4 holds step 2's weights: intact and named.
    assert "step_0000004" in str(err.value)
    assert os.path.exists(tmp_path / "checkpoints" / "step_0000004" / "meta.json")
    assert [r["skipped_generator_updates"] for r in rows(tmp_path)] == [0.0, 0.0, 1.0, 1.0]


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "fastdmd.train", *TINY, "--trainer.steps", "500", "--run_dir", run_dir,
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "Resume with" in out
    stopped = rows(run_dir)[-1]["step"]
    assert 3 <= stopped < 500
    assert os.path.exists(os.path.join(run_dir, "checkpoints", f"step_{stopped:07d}", "meta.json"))
    main(["--resume", "--run_dir", run_dir, "--trainer.steps", str(stopped + 2)])
    assert [r["step"] for r in rows(run_dir)] == list(range(1, stopped + 3))
