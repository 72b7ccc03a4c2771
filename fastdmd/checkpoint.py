"""Checkpoints with torch.distributed.checkpoint, written atomically.

Each checkpoint is a folder `checkpoints/step_XXXXXXX`. It is written as `step_XXXXXXX.tmp` and
renamed only when complete (with a `meta.json` inside), so a crash during a save leaves the
previous checkpoint usable; the last `keep` complete ones are kept. What goes in: generator,
generator EMA, critic, both optimizers and the step; the random streams need no state because
every rank draws step t's randomness from (seed, rank, t).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from fastdmd.distributed import World, barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d{7})$")


class CheckpointError(RuntimeError):
    pass


@contextlib.contextmanager
def _single_process_quiet(world: World):
    """DCP warns on every save/load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        if not world.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str, step: int, state: dict, world: World, keep: int) -> str:
    root = checkpoint_dir(run_dir)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = final + ".tmp"
    if world.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    with _single_process_quiet(world):
        dcp.save(state, checkpoint_id=tmp)
    barrier(world)
    if world.is_main:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": world.world_size}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def load_checkpoint(path: str, state: dict, world: World) -> int:
    """Load into `state` in place (DCP) and return the saved step."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        step = int(meta["step"])
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupted ({e}); "
                              f"delete it to resume from the one before") from e
    try:
        with _single_process_quiet(world):
            dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"could not load checkpoint {path} ({reason}); delete it to resume from the one before, "
                              f"or check that the config matches the run that wrote it") from e
    return broadcast_object(step, world)
