"""Checkpoints with torch.distributed.checkpoint, written atomically.

Each checkpoint is a folder `checkpoints/step_XXXXXXX`. It is written as `step_XXXXXXX.tmp` and
renamed only when complete (with a `meta.json` inside), so a crash during a save leaves the
previous checkpoint usable; the last `keep` complete ones are kept, and older ones are renamed to
`*.deleting` before they are removed, so a kill mid-removal never leaves a half-deleted folder under
a complete name. Anything else in checkpoints/ (a `.tmp` or `.deleting` left by a killed process)
is never loaded and is removed by `discard_partial_checkpoints` when the next attempt starts. A
failed write (a full disk) removes its partial folder and raises CheckpointWriteError, which names
the run directory, the intact previous checkpoint and how to resume. What goes in: generator,
generator EMA, critic, both optimizers and the step; the random streams need no state because
every rank draws step t's randomness from (seed, rank, t).
"""

from __future__ import annotations

import contextlib
import errno
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


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is whole but its tensors do not fit the networks this config builds (other model
    settings): deleting it would not help."""


# How DCP's load planner words a checkpoint that does not fit the state it loads into
_MISMATCH_REASONS = ("Size mismatch between saved", "Missing key in checkpoint state_dict")


_PARTIAL_SUFFIXES = (".tmp", ".deleting")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # errnos of a full disk or an exhausted quota


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


def write_atomically(path: str, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a kill) sees the old file or the new one, never
    a torn one: write a sibling temp file, flush it to disk, rename it over `path`. A write cut short (a full
    disk, a SIGTERM handler that raises) removes the temp file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def discard_partial_checkpoints(run_dir: str) -> list[str]:
    """Remove what killed saves left in checkpoints/ (`*.tmp`, `*.deleting`); return the names removed.
    Call on rank 0 before a run starts writing."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    partial = sorted(name for name in os.listdir(root) if name.endswith(_PARTIAL_SUFFIXES))
    for name in partial:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return partial


def _discard(path: str) -> None:
    """Delete a checkpoint folder so that no step_XXXXXXX name ever points at a half-deleted one."""
    doomed = path + ".deleting"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(run_dir: str, step: int, state: dict, world: World, keep: int) -> str:
    """Write step `step` to checkpoints/step_XXXXXXX atomically, then keep the last `keep` complete ones.
    A complete checkpoint of the same step is kept as it is: the state at a step is the same whichever
    attempt reaches it (a run resumed at step N and stopped at once saves step N again)."""
    root = checkpoint_dir(run_dir)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = final + ".tmp"
    if broadcast_object(os.path.exists(os.path.join(final, "meta.json")), world):
        return final
    if world.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    try:
        with _single_process_quiet(world):
            dcp.save(state, checkpoint_id=tmp)
    except (OSError, CheckpointException) as e:  # every rank gets DCP's exception, with all ranks' failures
        failed = _write_failure(e)
    else:
        failed = None
    barrier(world)
    if world.is_main and failed is None:
        try:
            write_atomically(os.path.join(tmp, "meta.json"), json.dumps({"step": step, "world_size": world.world_size}))
            if os.path.exists(final):  # incomplete (no meta.json): replaced by the complete one
                _discard(final)
            os.replace(tmp, final)
        except OSError as e:
            failed = _write_failure(e)
    failed = broadcast_object(failed, world)
    if failed is not None:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial write is never loaded; removing it frees its space
        raise CheckpointWriteError(_write_failure_message(run_dir, final, world.world_size, *failed))
    if world.is_main:
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            _discard(old)
    barrier(world)
    return final


def _write_failure(e: BaseException) -> tuple[bool, str]:
    """(disk full?, one-line reason) of a failed save. A full disk surfaces from DCP's tensor writer as a
    RuntimeError whose context is OSError(ENOSPC)."""
    causes = _causes(e)
    full = next((c for c in causes if isinstance(c, OSError) and c.errno in DISK_FULL), None)
    if full is not None:
        return True, os.strerror(full.errno)
    return False, _root_reason(causes, e)


def _causes(e: BaseException) -> list[BaseException]:
    """e, the per-rank exceptions DCP wraps in a CheckpointException, and every cause and context of those."""
    pending, seen = [e, *(exc for exc, _ in getattr(e, "failures", {}).values())], []
    while pending:
        exc = pending.pop()
        if exc is None or any(exc is s for s in seen):
            continue
        seen.append(exc)
        pending += [exc.__cause__, exc.__context__]
    return seen


def _root_reason(causes: list[BaseException], e: BaseException) -> str:
    """The first line of the first exception that is not DCP's wrapper ("CheckpointException ranks: ...")."""
    first = next((c for c in causes if not isinstance(c, CheckpointException)), e)
    return next((line for line in str(first).splitlines() if line.strip()), type(first).__name__)


def launch_command(world_size: int = 1) -> str:
    """How a run of `world_size` ranks starts: torchrun with as many ranks (on as many nodes) when several."""
    if world_size <= 1:
        return "python -m fastdmd.train"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if per_node >= world_size:
        return f"torchrun --nproc_per_node {world_size} -m fastdmd.train"
    return f"torchrun --nnodes {world_size // per_node} --nproc_per_node {per_node} <rendezvous options> -m fastdmd.train"


def how_to_continue(run_dir: str, world_size: int = 1) -> str:
    """The command that continues a stopped run: --resume when it saved a checkpoint, else a fresh start; on
    as many ranks (a resume on another number changes the batch unless trainer.global_batch_size is set)."""
    if latest_checkpoint(run_dir) is None:
        return (f"start it again with its original options (it saved no checkpoint to resume from): "
                f"{launch_command(world_size)} --run_dir {run_dir} ...")
    return f"resume with: {launch_command(world_size)} --resume --run_dir {run_dir}"


def checkpoint_world_size(path: str) -> int | None:
    """The number of ranks that wrote a complete checkpoint (None for one written before meta.json said)."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None


def _write_failure_message(run_dir: str, path: str, world_size: int, disk_full: bool, reason: str) -> str:
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    fix = f"Free space on the disk that holds {run_dir}" if disk_full else f"Check that {run_dir} is writable"
    return f"could not write checkpoint {path} ({reason}); {kept} and the partial write was removed. " \
           f"{fix}, then {how_to_continue(run_dir, world_size)}"


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
            # no_dist for a one-process World even inside torchrun: loading a whole generator
            # (model.init_generator) on rank 0 alone must not wait for the other ranks.
            dcp.load(state, checkpoint_id=path, no_dist=not world.distributed)
    except TypeError:  # a wrong call (say an older torch's dcp.load), not a damaged checkpoint: no advice to delete
        raise
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        reason = _root_reason(_causes(e), e)
        if reason.startswith(_MISMATCH_REASONS):
            raise CheckpointMismatch(f"checkpoint {path} does not fit the networks this config builds ({reason}); "
                                     f"it is intact: load it with the model settings of the run that wrote it") from e
        raise CheckpointError(f"could not load checkpoint {path} ({reason}); delete it to resume from the one before, "
                              f"or check that the config matches the run that wrote it") from e
    return broadcast_object(step, world)
