"""Fault injection: NaNs in the teacher, the loss and the gradients; SIGTERM mid-run; SIGKILL at
random moments and mid-checkpoint; a full disk during a save and during a metrics write."""

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from fastdmd import ops
from fastdmd import trainer as trainer_mod
from fastdmd.checkpoint import complete_checkpoints
from fastdmd.roles import RealScore
from fastdmd.train import main
from fastdmd.trainer import NonFiniteError

TINY = ["--trainer.batch_size", "8", "--trainer.log_every", "1", "--trainer.sample_every", "0",
        "--trainer.warmup_steps", "0", "--eval.at_end", "false"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def subprocess_env(**extra):
    """The environment of a training subprocess: this checkout's fastdmd first on the path, one thread."""
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


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
    seen = {}
    real_step = trainer_mod.Trainer._step_if_finite

    def spy(self, role, loss, grad_norm, opt, step, *scale_and_ema):
        if role == "generator":
            before = [p.detach().clone() for p in self.generator.parameters()]
            state = {k: v.clone() for k, v in opt.state[next(iter(self.generator.parameters()))].items()} \
                if opt.state else {}
            skipped = real_step(self, role, loss, grad_norm, opt, step, *scale_and_ema)
            after = list(self.generator.parameters())
            seen[step] = (skipped, all(torch.equal(a, b) for a, b in zip(before, after)), state,
                          {k: v.clone() for k, v in opt.state[after[0]].items()} if opt.state else {})
            return skipped
        return real_step(self, role, loss, grad_norm, opt, step, *scale_and_ema)

    monkeypatch.setattr(trainer_mod.Trainer, "_step_if_finite", spy)
    _poison_loss(monkeypatch, bad_steps={2})
    main(TINY + ["--trainer.steps", "3", "--run_dir", str(tmp_path)])
    skipped, unchanged, state_before, state_after = seen[2]
    assert skipped and unchanged
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    # Step 1 has a zero DMD gradient (the critic starts as the teacher and g = 1); step 3 does not.
    assert not seen[3][0] and not seen[3][1]  # a healthy step does move the weights
    assert [r["skipped_generator_updates"] for r in rows(tmp_path)] == [0.0, 1.0, 0.0]


def test_with_master_weights_a_nan_loss_is_skipped_on_the_device(tmp_path, monkeypatch):
    """perf.master_weights: the trainer does not wait for the GPU to decide a skip. MasterAdamW's update sees
    the non-finite flag on the device and writes nothing (fp32 weights, moments, EMA), and the step count it
    advanced is given back when the flags are read with the step's logs: after the bad step 2 the
    generator's state is step 1's, and step 3 counts 2."""
    snapshots = {}
    real_train_step = trainer_mod.Trainer.train_step

    def snapshot(trainer):
        first = next(iter(trainer.generator.parameters()))
        state = trainer.opt_g.state.get(first, {})
        return ([p.detach().clone() for p in trainer.generator.parameters()],
                {k: v.clone() for k, v in state.items()},
                [e.clone() for e in trainer.ema.shadow] if trainer.ema is not None else [])

    def spy(self, step):
        before = snapshot(self)
        row = real_train_step(self, step)
        snapshots[step] = (before, snapshot(self))
        return row

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", spy)
    _poison_loss(monkeypatch, bad_steps={2})
    main(TINY + ["--trainer.steps", "3", "--run_dir", str(tmp_path), "--perf.mixed_precision", "bf16",
                 "--perf.master_weights", "true"])
    (weights, state, ema), (weights_after, state_after, ema_after) = snapshots[2]
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_after))
    assert state.keys() == {"step", "exp_avg_sq"} and float(state["step"]) == 1.0  # beta1 0: no exp_avg kept
    assert all(torch.equal(state[k], state_after[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(ema, ema_after))
    (weights, _, _), (weights_after, state_after, _) = snapshots[3]
    assert not all(torch.equal(a, b) for a, b in zip(weights, weights_after)) and float(state_after["step"]) == 2.0
    assert [r["skipped_generator_updates"] for r in rows(tmp_path)] == [0.0, 1.0, 0.0]
    assert [r["skipped_critic_updates"] for r in rows(tmp_path)] == [0.0, 0.0, 0.0]


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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
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


# Runs fastdmd.train as `python -m` does, sending itself SIGTERM as the Trainer method named by its first
# argument (save, evaluate) starts at the final step
TERMINATED_IN = """
import os, runpy, signal, sys
from fastdmd.trainer import Trainer

name = sys.argv.pop(1)
method = getattr(Trainer, name)

def terminated_first(self, *args, **kwargs):
    if self.step == self.cfg.trainer.steps:
        os.kill(os.getpid(), signal.SIGTERM)
    return method(self, *args, **kwargs)

setattr(Trainer, name, terminated_first)
sys.argv = ["fastdmd.train", *sys.argv[1:]]
runpy.run_module("fastdmd.train", run_name="__main__")
"""


@pytest.mark.parametrize("method, said", [
    ("save", "stopped by SIGTERM after step 2; checkpoint saved"),
    ("evaluate", "stopped by SIGTERM during the final evaluation; the checkpoint of step 2 is complete"),
], ids=["save", "evaluate"])
def test_sigterm_in_the_final_save_or_evaluation_exits_zero_and_the_resume_evaluates(tmp_path, monkeypatch, method,
                                                                                     said):
    """A preemption notice during the last checkpoint lets the save finish (the handler was gone by then: the
    process died mid-save); one during the final evaluation ends the evaluation (the process was killed, exit
    -15, with nothing said). Either way: exit 0 with the resume command, and the resume at the last step
    evaluates."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", TERMINATED_IN, method, *TINY, "--trainer.steps", "2", "--eval.at_end", "true",
           "--eval.num_samples", "20", "--eval.teacher_steps", "2", "--run_dir", str(run_dir), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(XDG_CACHE_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert said in proc.stdout and "--resume --run_dir" in proc.stdout
    assert os.path.exists(run_dir / "checkpoints" / "step_0000002" / "meta.json")
    assert not os.path.exists(run_dir / "summary.json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the teacher rows the subprocess cached, if it got so far
    main(["--resume", "--run_dir", str(run_dir)])
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


# ----- SIGKILL at random moments and mid-checkpoint ----------------------------------------------

KILLED_RUN = [*TINY, "--trainer.steps", "12", "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "2",
              "--threads", "1"]

# Runs fastdmd.train as `python -m` does, with the process's first checkpoint save held at one point
# until the test kills it: FASTDMD_TEST_HOLD=data holds it after the tensor data is written and before
# DCP's .metadata; =rename after DCP is done, before meta.json and the rename. FASTDMD_TEST_HELD is the
# file it writes when it gets there.
HOLD_IN_SAVE = """
import os, runpy, sys, time
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter

def hold():
    with open(os.environ["FASTDMD_TEST_HELD"], "w") as f:
        f.write(os.environ["FASTDMD_TEST_HOLD"])
    time.sleep(600)

if os.environ["FASTDMD_TEST_HOLD"] == "data":
    finish = FileSystemWriter.finish
    FileSystemWriter.finish = lambda self, *args, **kwargs: (hold(), finish(self, *args, **kwargs))[1]
else:
    save = dcp.save
    dcp.save = lambda *args, **kwargs: (save(*args, **kwargs), hold())[0]
runpy.run_module("fastdmd.train", run_name="__main__", alter_sys=True)
"""


class Attempt:
    """One training subprocess on a run directory; its output goes to a log file."""

    def __init__(self, run_dir: str, log: str, resume: bool = False, hold: str | None = None):
        args = [*KILLED_RUN, "--run_dir", run_dir, *(["--resume"] if resume else [])]
        self.held = log + ".held"
        env = subprocess_env(FASTDMD_TEST_HOLD=hold, FASTDMD_TEST_HELD=self.held) if hold else subprocess_env()
        cmd = [sys.executable, "-c", HOLD_IN_SAVE, *args] if hold else [sys.executable, "-m", "fastdmd.train", *args]
        self.run_dir, self.log = run_dir, log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait_until(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited with {self.proc.returncode} before {what}:\n{self.output()[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {what} after {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.01)

    def logged_steps(self) -> int:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        return len(rows(self.run_dir)) if os.path.exists(path) else 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL, "the process ended before the kill landed"


def _checkpoint_folders(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def test_sigkill_at_random_moments_and_mid_save_resumes_to_the_uninterrupted_losses(tmp_path, capsys):
    """Five attempts on one run directory, four of them killed with SIGKILL: twice while a checkpoint
    is being written (held there), twice at a random moment; the run still ends with exactly the
    metrics of an uninterrupted run (bitwise on CPU)."""
    rng = random.Random(8)
    run_dir, ref_dir = str(tmp_path / "killed"), str(tmp_path / "reference")
    reference = Attempt(ref_dir, str(tmp_path / "reference.log"))  # runs alongside, to the end
    kills = []

    def record(how, attempt):
        saved = complete_checkpoints(run_dir)
        kills.append(f"{how}: last logged step {attempt.logged_steps()}, last complete checkpoint "
                     f"{saved[-1][0] if saved else None}, checkpoints/ {_checkpoint_folders(run_dir)}")

    def kill_at_random_moment(attempt, first, last):
        target = rng.randint(first, last)
        attempt.wait_until(lambda: attempt.logged_steps() >= target, f"{target} metrics rows")
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)
        attempt.kill()
        record(f"at a random moment ({delay:.2f} s after metrics row {target})", attempt)

    def kill_when_held(attempt):
        attempt.wait_until(lambda: os.path.exists(attempt.held), "held checkpoint save")
        attempt.kill()
        record(f"mid-save, held at '{open(attempt.held).read()}'", attempt)

    # 1. Killed while the first checkpoint's tensors are being written: nothing complete to resume from.
    kill_when_held(Attempt(run_dir, str(tmp_path / "1.log"), hold="data"))
    assert complete_checkpoints(run_dir) == [] and _checkpoint_folders(run_dir) == ["step_0000002.tmp"]
    assert ".metadata" not in os.listdir(os.path.join(run_dir, "checkpoints", "step_0000002.tmp"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as done:
            main(["--resume", "--run_dir", run_dir])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and "no complete checkpoint under" in err[0]
    assert "removed partial checkpoint(s) left by an interrupted save: step_0000002.tmp" in out
    assert not os.listdir(os.path.join(run_dir, "checkpoints"))

    # 2. Started again without --resume in the same directory, killed at a random moment.
    attempt = Attempt(run_dir, str(tmp_path / "2.log"))
    kill_at_random_moment(attempt, 3, 5)
    assert "starting" in attempt.output() and "over: an earlier attempt there saved no checkpoint" in attempt.output()
    assert [r["step"] for r in rows(run_dir)][:3] == [1, 2, 3], "the earlier attempt's rows were not dropped"
    first_resume = complete_checkpoints(run_dir)[-1]  # step 3 was logged, so step 2 was saved

    # 3. Resumed, killed after DCP wrote the next checkpoint but before its meta.json and rename.
    attempt = Attempt(run_dir, str(tmp_path / "3.log"), resume=True, hold="rename")
    kill_when_held(attempt)
    assert f"resumed from {first_resume[1]} at step {first_resume[0]}" in attempt.output()
    partial = f"step_{first_resume[0] + 2:07d}.tmp"
    assert partial in _checkpoint_folders(run_dir)
    assert complete_checkpoints(run_dir)[-1] == first_resume  # the held save never became complete

    # 4. Resumed (from the same checkpoint: the partial one is not picked), killed at a random moment.
    attempt = Attempt(run_dir, str(tmp_path / "4.log"), resume=True)
    kill_at_random_moment(attempt, first_resume[0] + 3, first_resume[0] + 5)
    assert f"resumed from {first_resume[1]} at step {first_resume[0]}" in attempt.output()
    assert f"removed partial checkpoint(s) left by an interrupted save: {partial}" in attempt.output()

    # 5. Resumed to the end.
    attempt = Attempt(run_dir, str(tmp_path / "5.log"), resume=True)
    assert attempt.proc.wait(timeout=600) == 0, attempt.output()[-3000:]
    assert reference.proc.wait(timeout=600) == 0, reference.output()[-3000:]

    def losses(run):
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows(run)]

    assert [r["step"] for r in rows(run_dir)] == list(range(1, 13))
    assert losses(run_dir) == losses(ref_dir)  # bitwise: JSON floats round-trip exactly
    assert _checkpoint_folders(run_dir) == ["step_0000010", "step_0000012"]
    print("\n".join(f"kill {i + 1}: {k}" for i, k in enumerate(kills)))


# ----- a full disk ----------------------------------------------------------------------------------

FULL_DISK_RUN = [*TINY, "--trainer.steps", "6", "--trainer.checkpoint_every", "2"]


class FullDiskFile:
    """A writable file on a disk with `room` bytes left: a write past it stores what fits, then raises
    OSError(ENOSPC) as the OS would."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self.room:
            self.file.write(data[:self.room] if isinstance(data, str) else memoryview(data).cast("B")[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _fill_disk_during_checkpoint(monkeypatch, step: int) -> None:
    """DCP's files of checkpoint `step` get 64 KiB of room, then the disk is full."""
    create_stream = dcp_filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def full_disk_stream(self, path, mode):
        with create_stream(self, path, mode) as stream:
            yield FullDiskFile(stream, 64 * 1024) if f"step_{step:07d}.tmp" in str(path) else stream

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", full_disk_stream)


def _fill_disk_during_metrics_row(monkeypatch, row: int) -> None:
    """The append of metrics row `row` stores half the line, then the disk is full."""
    appends = {"n": 0}

    def limited_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if str(path).endswith("metrics.jsonl") and mode == "a":
            appends["n"] += 1
            if appends["n"] == row:
                return FullDiskFile(file, 40)
        return file

    monkeypatch.setattr(trainer_mod, "open", limited_open, raising=False)


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    main(FULL_DISK_RUN + ["--run_dir", run_dir])
    return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows(run_dir)]


def test_an_atomic_write_cut_short_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from fastdmd.checkpoint import write_atomically

    path = tmp_path / "summary.json"
    write_atomically(str(path), "old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_atomically(str(path), "new")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["summary.json"]


@pytest.mark.parametrize("where, expected", [
    ("checkpoint", ["could not write checkpoint", "step_0000004 (No space left on device)",
                    "the previous checkpoint {run}/checkpoints/step_0000002 is intact",
                    "Free space on the disk that holds {run}, then resume with: "
                    "python -m fastdmd.train --resume --run_dir {run}"]),
    ("metrics", ["no space left on device while writing {run}; free space on the disk that holds {run}, "
                 "then resume with: python -m fastdmd.train --resume --run_dir {run}"]),
])
def test_full_disk_keeps_the_previous_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, capsys,
                                                                         uninterrupted_losses, where, expected):
    run = str(tmp_path / "run")
    if where == "checkpoint":
        _fill_disk_during_checkpoint(monkeypatch, step=4)
    else:
        _fill_disk_during_metrics_row(monkeypatch, row=3)
    with pytest.raises(SystemExit) as done:
        main(FULL_DISK_RUN + ["--run_dir", run])
    err = capsys.readouterr().err  # the progress bar, then the error
    lines = [line for line in err.splitlines() if line.startswith("fastdmd:")]
    assert done.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert all(text.format(run=run) in lines[0] for text in expected), lines[0]
    # Only the complete checkpoint is left: the partial write was removed and nothing points at it.
    assert _checkpoint_folders(run) == ["step_0000002"]

    monkeypatch.undo()  # space was freed
    main(["--resume", "--run_dir", run])
    assert "resumed from" in capsys.readouterr().out
    assert [{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows(run)] == uninterrupted_losses
