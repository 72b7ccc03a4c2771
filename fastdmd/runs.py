"""A run's trained generator, outside the trainer: the one loader that export and generate share.

A run directory (written by `python -m fastdmd.train`) holds config.json and DCP checkpoints in
checkpoints/step_XXXXXXX (see fastdmd/checkpoint.py). The generator comes from the latest complete
checkpoint: its EMA weights when the checkpoint has them (trainer.ema_decay > 0), else the raw
generator weights. Only those tensors are read, into a fresh UNet from build_digits_unet().
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed.checkpoint as dcp
from diffusers import UNet2DModel

from fastdmd.checkpoint import CheckpointError, checkpoint_dir, latest_checkpoint, load_checkpoint
from fastdmd.config import Config, ConfigError, ModelConfig, from_dict
from fastdmd.distributed import World
from fastdmd.models.digits import DigitsFlowAdapter, build_digits_unet
from fastdmd.roles import Generator

WEIGHTS = {"ema": "EMA weights", "raw": "raw generator weights (the run kept no EMA)"}


class UsageError(ValueError):
    """A request the run tools cannot serve: a missing or incomplete run or export directory, a label
    outside 0..9, a bad step count. The message names the bad value and what would be valid; the
    command-line tools print it and exit with code 2."""


@dataclass(frozen=True)
class TrainedGenerator:
    """A trained few-step generator and what is needed to sample from it."""

    net: UNet2DModel | None  # the velocity network (digits UNet, SD3 / FLUX transformer), eval mode, CPU; None for
    #                          an SD3 / FLUX export, whose transformer/ loads as the family's network
    sigmas: tuple[float, ...]  # the noise levels of the few-step sampler it was trained for
    guidance_scale: float  # the teacher's CFG scale during distillation (the student samples without CFG)
    weights: str  # "ema" or "raw", keys of WEIGHTS
    step: int  # the training step of the checkpoint
    run_dir: str
    checkpoint: str
    family: str = "digits"
    model: ModelConfig | None = None  # the run's model section (sd3 / flux: model.path is the diffusers directory
    #                                   with text encoders, VAE, scheduler: the teacher's, or the export's)

    def x0_fn(self) -> Generator:
        """(x_t, sigma, labels) -> x0, the callable few_step_sample expects."""
        return Generator(self.net, DigitsFlowAdapter())

    def describe(self) -> str:
        return f"{WEIGHTS[self.weights]} from {self.checkpoint} (step {self.step})"


def require_run_dir(run_dir: str) -> None:
    if not os.path.isdir(run_dir):
        what = "is a file" if os.path.exists(run_dir) else "does not exist"
        raise UsageError(f"run directory {run_dir} {what}; expected a folder written by `python -m fastdmd.train` "
                         f"(config.json, metrics.jsonl, checkpoints/)")


def read_run_config(run_dir: str) -> Config:
    """The Config the run was trained with, from RUN_DIR/config.json."""
    require_run_dir(run_dir)
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise UsageError(f"{run_dir} is not a fastdmd run directory: {path} is missing "
                         f"(`python -m fastdmd.train` writes it when a run starts)")
    try:
        with open(path) as f:
            return from_dict(json.load(f))
    except (json.JSONDecodeError, ConfigError) as e:
        raise UsageError(f"{path} does not describe a valid run: {e}") from None


def load_run_generator(run_dir: str) -> TrainedGenerator:
    """The generator of the run's latest complete checkpoint (EMA weights when present)."""
    cfg = read_run_config(run_dir)
    path = latest_checkpoint(run_dir)
    if path is None:
        raise UsageError(f"no complete checkpoint in {checkpoint_dir(run_dir)}: expected a step_XXXXXXX folder with "
                         f"a meta.json inside (a run saves one at its end and every trainer.checkpoint_every steps)")
    weights = "ema" if _has_ema(path) else "raw"
    net = build_digits_unet() if cfg.model.family == "digits" else _empty_transformer(cfg)
    # Names as in Trainer.checkpoint_state(): the EMA is keyed by Generator.named_parameters()
    # ("net.<param>"), the raw generator by get_state_dict of the Generator module (same names).
    # The EMA holds parameters only; buffers (e.g. SD3's positional table) come from the config.
    tensors = dict(net.named_parameters()) if weights == "ema" else net.state_dict()
    params = {f"net.{name}": tensor.data for name, tensor in tensors.items()}
    state = {"generator_ema": params} if weights == "ema" else {"generator": {"model": params}}
    with warnings.catch_warnings():  # DCP warns that it loads in a single process, which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        step = load_checkpoint(path, state, World())  # loads in place into net's tensors
    return TrainedGenerator(net=net.eval().requires_grad_(False), sigmas=tuple(cfg.dmd.generator_sigmas),
                            guidance_scale=cfg.dmd.guidance_scale, weights=weights, step=step,
                            run_dir=os.path.abspath(run_dir), checkpoint=os.path.abspath(path),
                            family=cfg.model.family, model=cfg.model)


TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def _empty_transformer(cfg: Config):
    """The family's transformer with the teacher's config (random weights, about to be overwritten)."""
    import diffusers

    cls = getattr(diffusers, TRANSFORMERS[cfg.model.family])
    try:
        return cls.from_config(cls.load_config(cfg.model.path, subfolder="transformer"))
    except OSError as e:
        raise UsageError(f"the run's teacher directory {cfg.model.path} no longer has transformer/config.json "
                         f"({e}); the export needs it for the architecture") from None


def _has_ema(path: str) -> bool:
    try:
        keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # a truncated or foreign .metadata file raises several types
        raise CheckpointError(f"could not read the index of checkpoint {path}: {e}") from e
    return any(k.startswith("generator_ema.") for k in keys)


@contextmanager
def cli_errors(prog: str):
    """Turn the tools' expected failures into one line on stderr and exit code 2."""
    try:
        yield
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
