"""Entry point: `python -m fastdmd.train [--recipe NAME] [--key.sub VALUE ...]`, also under torchrun.

With no arguments it runs recipe digits-dmd2 on CPU: the shipped digits teacher distilled into a
4-step student, with a progress bar, a run directory and a closing summary table.
"""

from __future__ import annotations

import sys

import torch

from fastdmd.checkpoint import CheckpointError
from fastdmd.config import ConfigError, parse_args
from fastdmd.distributed import broadcast_object, init_world, shutdown
from fastdmd.runs import UsageError
from fastdmd.trainer import Trainer, default_run_dir


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"fastdmd: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.resume and not cfg.run_dir:
        print("fastdmd: config error: --resume needs --run_dir pointing at the run to continue", file=sys.stderr)
        raise SystemExit(2)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = init_world()
    try:
        cfg.run_dir = broadcast_object(cfg.run_dir or default_run_dir(cfg), world)
        return Trainer(cfg, world).fit()
    except (FileNotFoundError, CheckpointError, ConfigError, UsageError) as e:
        # Missing inputs and unusable checkpoints are the user's to fix: one line, no traceback.
        print(f"fastdmd: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        shutdown(world)


if __name__ == "__main__":
    main()
