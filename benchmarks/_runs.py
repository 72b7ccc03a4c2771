"""What the run benchmarks (digits_default.py, methods_digits.py) share: one `fastdmd.train` run as its
own process, timed end to end, its output in RUN_DIR/train.log and its summary.json read back."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time


def run_training(cmd: list[str], run_dir: str, what: str) -> tuple[float, dict]:
    """(wall seconds, summary) of `cmd` writing to run_dir; exits naming `what` and the log on failure."""
    print("$", shlex.join(cmd), flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts over: fastdmd.train refuses a used run dir
    os.makedirs(run_dir, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}); see {run_dir}/train.log")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return wall, json.load(f)
