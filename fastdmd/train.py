"""Entry point: `python -m fastdmd.train [--recipe NAME] [--key.sub VALUE ...]`, also under torchrun.

With no arguments it runs recipe digits-dmd2 on CPU: the shipped digits teacher distilled into a
4-step student, with a progress bar, a run directory and a closing summary table.

Before any work it settles the run directory: a fresh run refuses a directory that already holds
checkpoints (it would prune them as its own, and --resume would then pick the old run's), starts
metrics.jsonl over when an earlier attempt there saved no checkpoint, and what killed saves left
behind is removed (fastdmd/checkpoint.py).
"""

from __future__ import annotations

import os
import sys

import torch

from fastdmd.checkpoint import (DISK_FULL, CheckpointError, complete_checkpoints, discard_partial_checkpoints,
                                how_to_continue)
from fastdmd.config import ConfigError, parse_args, per_rank_batch
from fastdmd.distributed import World, barrier, broadcast_object, init_world, shutdown
from fastdmd.runs import UsageError
from fastdmd.trainer import Trainer, default_run_dir


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg = parse_args(argv)
        if cfg.resume and not cfg.run_dir:
            raise ConfigError("--resume needs --run_dir pointing at the run to continue")
        cfg.trainer.batch_size = per_rank_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"fastdmd: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = init_world(cfg.trainer.collective_timeout_s)
    try:
        # Every rank runs rank 0's settings: each read config.json and the checkpoints (--resume, --resume auto) on
        # its own, and a shared filesystem need not show them all the same files at the same moment.
        if world.is_main:
            cfg.run_dir = cfg.run_dir or default_run_dir(cfg)
        cfg = broadcast_object(cfg, world)
        prepare_run_dir(cfg.run_dir, cfg.resume, world)
        return Trainer(cfg, world).fit()
    except (FileNotFoundError, CheckpointError, ConfigError, UsageError) as e:
        # Missing inputs and unusable checkpoints are the user's to fix: one line, no traceback.
        print(f"fastdmd: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(f"fastdmd: error: {os.strerror(e.errno).lower()} while writing {e.filename or cfg.run_dir}; free space "
              f"on the disk that holds {cfg.run_dir}, then {how_to_continue(cfg.run_dir, world.world_size)}",
              file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        shutdown(world)


def prepare_run_dir(run_dir: str, resume: bool, world: World) -> None:
    """Check and tidy the run directory before the models are built (rank 0 writes, all ranks wait)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError(f"--run_dir {run_dir} is a file; give a folder (new, or a run's to --resume)")
    saved = broadcast_object(complete_checkpoints(run_dir), world)  # every rank acts on rank 0's view
    if saved and not resume:
        raise UsageError(f"run directory {run_dir} already holds checkpoints up to step {saved[-1][0]}; continue "
                         f"that run with --resume, or choose a new --run_dir")
    if world.is_main:
        removed = discard_partial_checkpoints(run_dir)
        if removed:
            print(f"removed partial checkpoint(s) left by an interrupted save: {', '.join(removed)}")
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if not resume and os.path.exists(metrics):
            os.remove(metrics)
            print(f"starting {run_dir} over: an earlier attempt there saved no checkpoint")
    barrier(world)


def exit_skipping_finalization() -> None:
    """Under torchrun, leave without interpreter finalization once the run is done and the process group
    destroyed: on CPU (gloo) a C++ destructor that runs at finalization aborted a rank now and then with
    "terminate called without an active exception" (SIGABRT, no Python frame; about 1 run in 6 of the
    2-rank test) after every file had been written, and torchrun then reported the run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_skipping_finalization()
