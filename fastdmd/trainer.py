"""The training loop: roles, optimizers, the DMD2 step, logging, sample grids, checkpoints, resume
and the final evaluation against the teacher.

One generator step (DESIGN.md, "One training step"):
  rollout (backward simulation, no grad) -> generator_fwd -> real_score / fake_score -> dmd_op
  -> generator_bwd -> optimizer -> critic_update x trainer.critic_updates
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Sequence
from typing import NamedTuple
from datetime import datetime, timezone

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from tqdm import tqdm

from fastdmd import ops
from fastdmd.checkpoint import (
    CheckpointMismatch, checkpoint_world_size, latest_checkpoint, launch_command, load_checkpoint, save_checkpoint,
    write_atomically,
)
from fastdmd.config import Config, ConfigError, to_dict
from fastdmd.data import load_digits
from fastdmd.data.digits import NUM_CLASSES
from fastdmd.accel import make_adamw, set_attention
from fastdmd.distributed import (World, barrier, broadcast_object, fill_from_rank0, mean_across_ranks, parallelize,
                                 reshard, stop_together)
from fastdmd.metrics import score_sampler
from fastdmd.models.family import Family, cast_network, load_family
from fastdmd.models.fusion import fuse_qkv, fused_attentions, use_gelu_epilogue
from fastdmd.objectives import OBJECTIVES, Batch, Roles, build_objective
from fastdmd.optim import MasterAdamW
from fastdmd.rewards import ClassifierLogProb, JpegCompressibility, build_reward
from fastdmd.generate import load_generator
from fastdmd.plot import save_grids
from fastdmd.profiling import StepProfiler, phase
from fastdmd.roles import Generator, build_roles
from fastdmd.runs import UsageError
from fastdmd.rollout import euler_sample, few_step_sample, linear_sigmas, renoise_draws, sample_with_draws
from fastdmd.rollout.graphs import CudaGraphs, GraphedRollout, graph_blocker
from fastdmd.tensorboard_log import TensorBoardLog


EVAL_VERSION = 2  # bump when the evaluation's figures change meaning (invalidates cached teacher rows)


class NonFiniteError(RuntimeError):
    pass


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu",
                   stream: tuple[int, ...] = ()) -> torch.Generator:
    """Step t of rank r always draws the same numbers: resume needs no RNG state. The generator lives
    on the training device, so every draw of the step happens there (CPU and CUDA streams differ).
    `stream` picks further independent streams of the same step (the critic's fresh samples)."""
    state = np.random.SeedSequence([seed, rank, step, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def shared_step_generator(seed: int, step: int, *stream: int) -> torch.Generator:
    """The same numbers on every rank at step t, for choices that decide how many sharded forwards
    a step runs (FSDP's collectives must match across ranks)."""
    state = np.random.SeedSequence([seed, step, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class EMA:
    """Exponential moving average of a module's parameters (works on FSDP2-sharded DTensors)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in module.named_parameters()]
        self.shadow = [p.detach().clone() for p in module.parameters()]
        # for an optimizer that moves the EMA in its own update (MasterAdamW): each weight's shadow
        self.by_parameter = dict(zip(module.parameters(), self.shadow))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        reshard(module)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, module: torch.nn.Module) -> None:
        """Exchange the module's weights with the EMA weights (call twice to restore)."""
        reshard(module)
        for p, s in zip(module.parameters(), self.shadow):
            tmp = p.detach().clone()
            p.detach().copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow):
                s.copy_(state[name])


# torch optimizers' param_group keys that choose an implementation, not the training's numbers
OPTIMIZER_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class RoleState(Stateful):
    """A trainable role and its optimizer, as DCP sees them."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state):
        # How this run's optimizer computes is its own, not the checkpoint's: one written by MasterAdamW or on
        # another device must not turn this run's fused AdamW into a for-loop one (or a step count into a
        # host tensor fused AdamW refuses).
        for group in state["optim"].get("param_groups", []):
            group.update({key: self.optimizer.defaults[key] for key in OPTIMIZER_IMPLEMENTATION_KEYS
                          if key in group and key in self.optimizer.defaults})
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]  # a LoRA critic trains its adapters only


def make_optimizer(module: torch.nn.Module, pairs: tuple[list, list] | None, lr: float, cfg,
                   perf) -> tuple[torch.optim.Optimizer, str]:
    """AdamW on the role's trainable weights: MasterAdamW when the step computes on a bf16 copy (perf.master_weights;
    `pairs` from weight_pairs), else torch's or apex's (accel.make_adamw)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if pairs is not None:
        copies, masters = pairs
        opt = MasterAdamW(masters, copies, lr, betas, weight_decay=cfg.weight_decay)
        backend = ops.master_adamw_backend(masters[0].device if masters else None)
        return opt, f"fastdmd MasterAdamW ({backend}: bf16 gradients in, bf16 copy out, fused EMA)"
    return make_adamw(trainable_parameters(module), lr, betas, cfg.weight_decay, perf)


def bf16_copy(role: torch.nn.Module, adapter) -> torch.nn.Module:
    """perf.master_weights: a bf16 copy of a trained role (its network, hooks and GAN head) sharing the role's
    adapter (whose prompt embeddings are not copied)."""
    return copy.deepcopy(role, memo={id(adapter): adapter}).to(torch.bfloat16)


def weight_pairs(compute: torch.nn.Module | None, master: torch.nn.Module | None,
                 fused_views: dict[str, torch.Tensor] | None = None) -> tuple[list, list] | None:
    """(a bf16 copy's trainable weights, the fp32 ones), paired by parameter name; None when the role computes
    with its own weights (no copy). `fused_views`: the copy's weights that perf.fuse_qkv merged, by their
    names in the fp32 role, as rows of the fused ones (fuse_qkv's views)."""
    if compute is master:
        return None
    copies = dict(compute.named_parameters()) | (fused_views or {})
    names = [name for name, p in master.named_parameters() if p.requires_grad]  # a LoRA critic: its adapters
    masters = dict(master.named_parameters())
    return [copies[name] for name in names], [masters[name] for name in names]


def lr_factor(updates_done: int, t) -> float:
    """Linear warm-up, then constant or cosine decay reaching 0 after trainer.steps updates."""
    warm = min(1.0, (updates_done + 1) / (t.warmup_steps + 1))
    if t.lr_schedule == "constant":
        return warm
    progress = min(1.0, updates_done / max(1, t.steps))
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


class DeviceDecidedUpdate(NamedTuple):
    """A MasterAdamW update whose skip was decided on the device (Trainer._step_on_device): its flags
    ({"loss", "gradient"}: True where non-finite) are read at the step's end."""
    role: str
    opt: MasterAdamW
    counted: list
    flags: dict


def read_scalars(*tensors: torch.Tensor) -> list[float]:
    """One-element tensors as floats, read with one device-to-host copy: each read waits for the GPU
    to finish its queue, so a step reads once per update rather than once per value."""
    tensors = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]  # FSDP2's DTensors
    device = tensors[0].device
    return torch.stack([t.detach().to(device, torch.float64).reshape(()) for t in tensors]).tolist()


def detached(logs: dict) -> dict:
    """A logged tensor kept to the step's end must not keep its autograd graph alive (a reward logged
    but not in the loss would hold the decoder's and reward model's activations through the critic update)."""
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in logs.items()}


def read_logs(rows: list[dict]) -> list[dict[str, float]]:
    """Logged values as floats; the tensors among them (objectives may log device tensors so as not
    to wait for the GPU mid-step) read together by `read_scalars`."""
    tensors = [v for row in rows for v in row.values() if isinstance(v, torch.Tensor)]
    values = iter(read_scalars(*tensors) if tensors else [])
    return [{k: next(values) if isinstance(v, torch.Tensor) else float(v) for k, v in row.items()} for row in rows]


class _EvaluationStopped(BaseException):
    """Raised by the SIGTERM handler of the final evaluation; a BaseException, as KeyboardInterrupt is, so that
    no `except Exception` on the way takes it for an error of its own."""


def default_run_dir(cfg: Config) -> str:
    return os.path.join("runs", f"{cfg.recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


class Trainer:
    def __init__(self, cfg: Config, world: World, family: Family | None = None):
        """`family` replaces the one cfg.model names (benchmarks build random-init models in memory)."""
        self.cfg, self.world = cfg, world
        if world.distributed and cfg.reward.device:
            raise ValueError(f"reward.device = {cfg.reward.device!r} would put every rank's reward models on that one "
                             f"device; under torchrun leave it empty (each rank scores on its own GPU, "
                             f"{world.device} here)")
        t = cfg.trainer
        ops.backend = cfg.ops.backend
        # perf.load_on_rank0: the other ranks' networks are built on the meta device; each takes its weights
        # from rank 0 as parallelize shards it.
        from_rank0 = world.distributed and cfg.perf.load_on_rank0
        reads_weights = world.is_main or not from_rank0
        self.family = family or self._load_family(cfg, world, weights=reads_weights)
        if self.family.prompt_cache:  # the default one is named after the prompts: config.json keeps where it is
            cfg.model.prompt_cache = os.path.abspath(self.family.prompt_cache)
        teacher, self.classifier, self.adapter = self.family.teacher, self.family.classifier, self.family.adapter
        # Under torchrun the networks stay in host memory until fully_shard moves each rank's shards to its
        # GPU: whole copies of the teacher, generator and critic on every GPU first would need ~10 B/param.
        place_whole = not world.distributed
        if place_whole:
            teacher.to(world.device)
        if self.classifier is not None:
            self.classifier.to(world.device)
        self.use_gan = cfg.dmd.gan_generator_weight > 0 or cfg.dmd.gan_critic_weight > 0
        critic = OBJECTIVES[cfg.method].uses_critic
        # New weights (peft's LoRA A matrices, the GAN head) draw from torch's global stream: seed it so
        # that a run repeats and every rank starts from the same weights.
        torch.manual_seed(t.seed)
        lora = cfg.dmdr.lora_rank if cfg.method == "dmdr" and cfg.dmdr.distribution_guidance else 0
        self.generator, self.real, self.fake = build_roles(teacher, self.adapter, gan=self.use_gan, critic=critic,
                                                           lora_rank=lora, lora_multiplier=cfg.dmdr.fake_lora_scale)
        base = None
        if cfg.model.init_generator:
            error = None
            if reads_weights:  # the others take the weights from rank 0 with the rest
                try:
                    self._init_generator_from(cfg.model.init_generator)
                except Exception as e:  # noqa: BLE001 - raised by stop_together, once every rank knows
                    error = e
            stop_together(error, world)
        if cfg.method == "drpo":
            base = Generator(copy.deepcopy(self.generator.net).eval().requires_grad_(False), self.adapter)
        if place_whole:
            self.generator.to(world.device)
            if self.fake is not None:
                self.fake.to(world.device)
        perf = cfg.perf
        # perf.master_weights: the step computes with bf16 copies of the generator and the critic (made before
        # compile wraps the blocks); self.generator and self.fake keep the fp32 weights the optimizers update.
        self.generator_compute, self.fake_compute = self.generator, self.fake
        if perf.master_weights:
            if world.distributed:
                raise ValueError("perf.master_weights is for one process (world size "
                                 f"{world.world_size}): under torchrun FSDP2's MixedPrecisionPolicy already runs "
                                 "every forward and backward on bf16 weights gathered from the fp32 shards")
            self.generator_compute = bf16_copy(self.generator, self.adapter)
            self.fake_compute = bf16_copy(self.fake, self.adapter) if self.fake is not None else None
        # perf.rollout_weights bf16: the rollout's own bf16 copy of the generator (made before compile wraps
        # the blocks), synchronized after each step's generator updates.
        self.rollout_generator = self.generator_compute
        if perf.rollout_weights == "bf16":
            if world.distributed:
                raise ValueError("perf.rollout_weights = 'bf16' keeps a whole bf16 copy of the generator: one process "
                                 f"only (world size {world.world_size}); under torchrun FSDP2's MixedPrecisionPolicy "
                                 "already runs every forward in bf16")
            self.rollout_generator = Generator(cast_network(copy.deepcopy(self.generator.net), torch.bfloat16)
                                               .requires_grad_(False), self.adapter)
        # perf.fuse_qkv: after build_roles copied the teacher's separate projections into the trained roles.
        self.fused_qkv, fused_views = self._fuse_qkv(teacher, perf.fuse_qkv)
        self.gelu_epilogue = "off"
        if perf.gelu_epilogue:
            nets = {id(r.net): r.net for r in filter(None, (self.generator, self.fake, self.generator_compute,
                                                            self.fake_compute, self.rollout_generator, base))}
            nets[id(teacher)] = teacher
            count = sum(use_gelu_epilogue(net) for net in nets.values())
            self.gelu_epilogue = (f"{count} feed-forward projections (no-grad forwards on CUDA)" if count
                                  else "nothing to change (no tanh-GELU feed-forward)")
        self.attention = set_attention(teacher, perf.attention)
        if not perf.cudnn_attention:
            torch.backends.cuda.enable_cudnn_sdp(False)
            self.attention += ", SDPA's cuDNN backend off"
        for role in filter(None, (self.generator, self.fake, self.generator_compute, self.fake_compute, base)):
            set_attention(role.net, perf.attention)
        parallelize(self.generator_compute.net, world, perf, from_rank0=from_rank0)
        if self.rollout_generator is not self.generator_compute:
            set_attention(self.rollout_generator.net, perf.attention)
            parallelize(self.rollout_generator.net, world, perf, trainable=False)
        # (a bf16 copy's weights, the fp32 ones they are refilled from) per copy, None without it: the compute
        # copies of perf.master_weights; the rollout's copy, paired by the generator's parameter names.
        self._generator_copy = weight_pairs(self.generator_compute, self.generator, fused_views.get("generator"))
        self._fake_copy = weight_pairs(self.fake_compute, self.fake, fused_views.get("fake"))
        self._rollout_copy = None
        if self.rollout_generator is not self.generator_compute:
            copy_params = dict(self.rollout_generator.net.named_parameters()) | fused_views.get("rollout", {})
            self._rollout_copy = ([copy_params[name] for name, _ in self.generator.net.named_parameters()],
                                  list(self.generator.net.parameters()))
        if self.fake is not None:
            parallelize(self.fake_compute.net, world, perf, extra=self.fake_compute.gan_head, from_rank0=from_rank0)
        if perf.shard_teacher or not world.distributed:
            parallelize(teacher, world, perf, trainable=False, from_rank0=from_rank0)
        else:
            if reads_weights:  # the others' are on the meta device: fill_from_rank0 places them
                teacher.to(world.device)
            if from_rank0:
                fill_from_rank0(teacher, world)
        if base is not None and world.distributed:  # DrPO's frozen base, sharded like the teacher
            parallelize(base.net, world, perf, trainable=False, from_rank0=from_rank0)
        if self.use_gan:  # real digits, only for the GAN term: each rank draws from its own shard of the train split
            train = load_digits("train")
            self.real_shard = (train.images[world.rank::world.world_size], train.labels[world.rank::world.world_size])
        self.reward = build_reward(cfg.reward, self.classifier, self.family.condition_names, world.device,
                                   None if self.family.name == "digits" else self.family.decode) \
            if cfg.method != "dmd2" else None
        self.rollout = GraphedRollout(self.rollout_generator, cfg.dmd.generator_sigmas, cfg.perf.cuda_graph_rollout,
                                      world.device, world.distributed)
        self.real.batched_cfg = perf.batched_cfg
        scores_blocker = graph_blocker("perf.cuda_graph_scores", perf.cuda_graph_scores, world.device,
                                       world.distributed)
        for name, score in (("real score", self.real), ("fake score", self.fake_compute)):
            if score is not None:
                score.graphs = CudaGraphs(score.eager_predict, scores_blocker, name)
        self.objective = build_objective(cfg, Roles(self.generator_compute, self.real, self.fake_compute, self.reward,
                                                    self.classifier, base, self._real_batch, self.rollout))
        self.ema = EMA(self.generator, t.ema_decay) if t.ema_decay > 0 else None
        self.opt_g, self.optimizer_name = make_optimizer(self.generator, self._generator_copy, t.lr_generator, t, cfg.perf)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda i: lr_factor(i, t))
        self.opt_c = self.sched_c = None
        if self.fake is not None:
            self.opt_c, _ = make_optimizer(self.fake, self._fake_copy, t.lr_critic, t, cfg.perf)
            self.sched_c = torch.optim.lr_scheduler.LambdaLR(self.opt_c, lambda i: lr_factor(i, t))
        # The parameters whose gradients each update reads (the bf16 copies' with perf.master_weights), listed
        # once: a walk of the module tree for them at every update is host time in a host-bound step.
        self._generator_params = list(self.generator_compute.parameters())
        self._fake_params = list(self.fake_compute.parameters()) if self.fake is not None else []
        self.step = 0
        self.bad_steps = 0
        self.stop_requested = False
        self.run_dir = cfg.run_dir
        self.test_set = load_digits("test") if self.classifier is not None else None

    @staticmethod
    def _load_family(cfg: Config, world: World, weights: bool) -> Family:
        """Under torchrun each node's first rank loads first and builds what the others then read (the
        prompt-embedding cache: its text encoders are loaded once per node, not once per rank).
        `weights` False: the teacher's architecture alone, on the meta device."""
        first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        family, error = None, None
        if first:
            try:
                family = load_family(cfg.model, world.device, weights)
            except Exception as e:  # noqa: BLE001 - raised below, once every rank knows (none waits for it)
                error = e
        stop_together(error, world)
        return family or load_family(cfg.model, world.device, weights)

    # ----- state -------------------------------------------------------------------------------
    def _init_generator_from(self, path: str) -> None:
        """model.init_generator: the generator's weights from a run or export of the same family and model."""
        trained = load_generator(path)
        if trained.family != self.cfg.model.family:
            raise UsageError(f"model.init_generator {path} holds a {trained.family} generator; this run's model.family is "
                             f"{self.cfg.model.family}: give a run or export of the same family")
        net = trained.net
        if net is None:  # an SD3 / FLUX export, whose trained transformer/ load_export leaves to the family loader
            from fastdmd.models.sd3 import load_transformer
            from fastdmd.runs import TRANSFORMERS

            net = load_transformer(trained.model.path, torch.float32, TRANSFORMERS[trained.family])
        theirs, ours = net.state_dict(), self.generator.net.state_dict()
        misfits = sorted(ours.keys() ^ theirs.keys()) + \
            sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
        if misfits:
            raise UsageError(f"model.init_generator {path}: its weights do not fit this run's {trained.family} "
                             f"generator (another model.path's?): {len(misfits)} tensors missing, extra or of "
                             f"another shape, e.g. {misfits[0]}")
        self.generator.net.load_state_dict(theirs)

    def checkpoint_state(self) -> dict:
        state = {"generator": RoleState(self.generator, self.opt_g)}
        if self.fake is not None:
            state["critic"] = RoleState(self.fake, self.opt_c)
        if self.ema is not None:
            state["generator_ema"] = self.ema
        if self.objective.state_dict():
            state["objective"] = self.objective
        return state

    def save(self) -> str:
        return save_checkpoint(self.run_dir, self.step, self.checkpoint_state(), self.world,
                               self.cfg.trainer.keep_checkpoints)

    def resume(self) -> None:
        path = broadcast_object(latest_checkpoint(self.run_dir), self.world)  # every rank loads rank 0's choice
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.run_dir}/checkpoints; "
                                    f"start without --resume or point --run_dir at a run that saved one")
        ranks, t = checkpoint_world_size(path), self.cfg.trainer
        if ranks and ranks != self.world.world_size and not t.global_batch_size:
            raise ConfigError(f"--resume: {path} was written by {ranks} ranks of trainer.batch_size {t.batch_size} "
                              f"({ranks * t.batch_size} samples per step); on {self.world.world_size} it would be "
                              f"{self.world.world_size * t.batch_size}: add --trainer.global_batch_size "
                              f"{ranks * t.batch_size} to keep the batch (or the one you want), or resume on {ranks} ranks")
        try:
            self.step = load_checkpoint(path, self.checkpoint_state(), self.world)
        except CheckpointMismatch as e:
            raise CheckpointMismatch(f"{e}{self._model_changes_since_saved()}") from e
        if self.step > self.cfg.trainer.steps:
            raise ConfigError(f"--resume: {path} is at step {self.step}, past trainer.steps = {self.cfg.trainer.steps}; "
                              f"give --trainer.steps {self.step} or more")
        for copy_pairs in (self._generator_copy, self._fake_copy, self._rollout_copy):
            self._refill(copy_pairs)
        for sched in filter(None, (self.sched_g, self.sched_c)):
            sched.last_epoch = self.step - 1
            sched.step()
        if self.world.is_main:
            _truncate_metrics(os.path.join(self.run_dir, "metrics.jsonl"), self.step)
            print(f"resumed from {path} at step {self.step}")

    def _model_changes_since_saved(self) -> str:
        """The model settings this resume changes from the run's saved config.json, as a clause to append."""
        try:
            with open(os.path.join(self.run_dir, "config.json")) as f:
                saved = json.load(f)["model"]
        except (OSError, ValueError, KeyError):
            return ""
        current = to_dict(self.cfg)["model"]
        changed = [f"model.{key} from {saved[key]!r} to {value!r}" for key, value in current.items()
                   if key in saved and saved[key] != value]
        return f" (this resume changes {', '.join(changed)})" if changed else ""

    # ----- one step ----------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.trainer
        dev = self.world.device
        if cfg.perf.blocks_in_cuda_graphs:
            # A new step for cudagraph trees: the graphs' outputs of the last step are no longer read.
            torch.compiler.cudagraph_mark_step_begin()
        rng = step_generator(t.seed, self.world.rank, step, dev)
        n = self.objective.group_size
        conditions = self.family.num_conditions
        labels = torch.randint(0, conditions, (t.batch_size // n,), generator=rng, device=dev).repeat_interleave(n)
        noise = torch.randn((t.batch_size, *self.family.sample_shape), generator=rng, device=dev)
        batch = Batch(step, labels, noise, self.backward_simulation_step(step), rng)

        logs, skipped_g, on_device = [], 0, []
        updates = self.objective.generator_updates(batch)
        while (update := self._next_update(updates)) is not None:
            with phase("generator_bwd"):
                update.loss.backward()
            with phase("optimizer"):
                norm = self._grad_norm(self._generator_params)
                if isinstance(self.opt_g, MasterAdamW):
                    on_device.append(self._step_on_device("generator", update.loss, norm, self.opt_g, self.ema))
                    loss_value, norm_value = update.loss.detach(), norm  # read with the step's logs
                else:
                    loss_value, norm_value = read_scalars(update.loss, norm)
                    self._clip(self._generator_params, norm, norm_value)
                    skipped = self._step_if_finite("generator", loss_value, norm_value, self.opt_g, step)
                    skipped_g += skipped
                    if self.ema is not None and not skipped:
                        self.ema.update(self.generator)
            logs.append(detached(update.logs) | {"loss_generator": loss_value, "grad_norm_generator": norm_value})
        self._refill(self._rollout_copy)
        self.sched_g.step()
        skipped_c, critic_logs = 0, []
        if self.fake is not None:
            with phase("critic_update"):
                # the generator's GAN term back-propagated through the critic (into the bf16 copy's gradients
                # with perf.master_weights; the fp32 weights' are replaced by each update's)
                for p in self._fake_params:
                    p.grad = None
                for i in range(t.critic_updates):
                    with self._autocast():
                        if t.critic_samples != "step":
                            self._fresh_critic_samples(step, i)
                        loss_c, c_logs = self.objective.critic_loss(step, rng)
                    loss_c.backward()
                    norm = self._grad_norm(self._fake_params)
                    if isinstance(self.opt_c, MasterAdamW):
                        on_device.append(self._step_on_device("critic", loss_c, norm, self.opt_c))
                    else:
                        loss_value, norm_value = read_scalars(loss_c, norm)
                        self._clip(self._fake_params, norm, norm_value)
                        skipped_c += self._step_if_finite("critic", loss_value, norm_value, self.opt_c, step)
                    critic_logs.append(detached(c_logs))
                self.sched_c.step()
        rows = read_logs(logs + critic_logs + [update.flags for update in on_device])
        logs, critic_logs, flags = rows[:len(logs)], rows[len(logs):len(logs) + len(critic_logs)], \
            rows[len(logs) + len(critic_logs):]
        for update, bad in zip(on_device, flags):
            if bad["loss"] or bad["gradient"]:
                update.opt.uncount(update.counted)
                self._say_skipped(update.role, step, bool(bad["loss"]))
                skipped_g += update.role == "generator"
                skipped_c += update.role == "critic"
        row = {key: float(np.mean([u[key] for u in logs])) for key in logs[0]}
        if critic_logs:
            row |= {key: float(np.mean([c[key] for c in critic_logs])) for key in critic_logs[0]}
        self.bad_steps = self.bad_steps + 1 if (skipped_g or skipped_c) else 0
        if self.bad_steps >= t.max_bad_steps:
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteError(f"{self.bad_steps} consecutive steps had non-finite losses or gradients (last at step "
                                 f"{step}); stopping. The last good checkpoint is {last}; lower the learning rates or "
                                 f"check the teacher and data, then --resume.")
        return row | {"skipped_generator_updates": float(skipped_g), "skipped_critic_updates": float(skipped_c)}

    def backward_simulation_step(self, step: int) -> int:
        """The step k of the few-step sampler that receives the gradient at training step `step`: drawn
        from the seed and the step alone, so every rank, and a resumed run, draws the same."""
        generator = shared_step_generator(self.cfg.trainer.seed, step)
        return int(torch.randint(0, len(self.cfg.dmd.generator_sigmas), (1,), generator=generator))

    @staticmethod
    @torch.no_grad()
    def _refill(pairs: tuple[list, list] | None) -> None:
        """Cast the updated fp32 weights into a bf16 copy (weight_pairs), in place: a captured CUDA graph reads
        the copy's storage. Nothing without a copy."""
        if pairs is not None:
            with phase("optimizer"):
                torch._foreach_copy_(*pairs)

    def _fuse_qkv(self, teacher: torch.nn.Module, enabled: bool) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
        """perf.fuse_qkv on the networks whose parameter names nothing keeps: the teacher, the rollout's bf16
        copy and, with perf.master_weights, the trained roles' bf16 copies (their gradients go to the fused
        weights; MasterAdamW steps each fp32 weight from its rows). Returns what the run header says and, per
        fused copy ("rollout", "generator", "fake"), its removed parameters as views of the fused ones, by
        their names in the fp32 role. A LoRA critic's copy is left as it is (its adapters wrap the projections)."""
        if not enabled:
            return "off", {}
        fuse_qkv(teacher)
        fused = {"teacher": fused_attentions(teacher)}
        views = {}
        if self.rollout_generator is not self.generator_compute:
            views["rollout"] = fuse_qkv(self.rollout_generator.net)
            fused["rollout copy"] = fused_attentions(self.rollout_generator.net)
        for key, label, compute, master in (("generator", "generator copy", self.generator_compute, self.generator),
                                            ("fake", "critic copy", self.fake_compute, self.fake)):
            if compute is None or compute is master or any("lora_" in n for n, _ in compute.net.named_parameters()):
                continue
            views[key] = {f"net.{name}": view for name, view in fuse_qkv(compute.net).items()}
            fused[label] = fused_attentions(compute.net)
        if not any(fused.values()):
            return "nothing to fuse (no SD3 / FLUX attention)", {}
        return ", ".join(name for name, n in fused.items() if n), views

    def _autocast(self):
        """bf16 autocast for the forwards in one process (under torchrun FSDP2's policy casts instead)."""
        if self.cfg.perf.mixed_precision == "bf16" and not self.world.distributed:
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_update(self, updates):
        with self._autocast():
            return next(updates, None)

    @torch.no_grad()
    def _fresh_critic_samples(self, step: int, update: int) -> None:
        """trainer.critic_samples fresh / fresh_last: the critic's update `update` of this step trains on a
        new no-grad batch of the current generator (new labels and noise; a random backward-simulation
        step k as in DMD2's TTUR loop, or the last step), not on the x0 the generator step used. Own
        random streams (resume-safe); k shared across ranks (FSDP)."""
        t, dmd, dev = self.cfg.trainer, self.cfg.dmd, self.world.device
        rng = step_generator(t.seed, self.world.rank, step, dev, stream=(1, update))
        labels = torch.randint(0, self.family.num_conditions, (t.batch_size,), generator=rng, device=dev)
        noise = torch.randn((t.batch_size, *self.family.sample_shape), generator=rng, device=dev)
        k = len(dmd.generator_sigmas) - 1 if t.critic_samples == "fresh_last" else \
            int(torch.randint(0, len(dmd.generator_sigmas), (1,), generator=shared_step_generator(t.seed, step, 1, update)))
        with phase("rollout"):
            x_t, sigma = self.rollout(noise, labels, k, rng)
            self.objective.remember(self.generator_compute(x_t, sigma, labels), labels)

    def _real_batch(self, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.real_shard
        idx = torch.randint(0, len(labels), (self.cfg.trainer.batch_size,), generator=rng, device=rng.device).cpu()
        return images[idx].to(self.world.device), labels[idx].to(self.world.device)

    def _step_if_finite(self, role: str, loss: float, grad_norm: float, opt, step: int) -> bool:
        """Apply the update only when the loss and the gradient are finite on every rank; otherwise
        drop the gradient (the optimizer state stays untouched) and say which phase produced it."""
        bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0, 0.0 if math.isfinite(grad_norm) else 1.0])
        if self.world.distributed:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.any():
            opt.zero_grad(set_to_none=True)
            self._say_skipped(role, step, bool(bad[0]))
            return True
        opt.step()
        opt.zero_grad(set_to_none=True)
        return False

    def _step_on_device(self, role: str, loss: torch.Tensor, norm: torch.Tensor, opt: MasterAdamW,
                        ema: EMA | None = None) -> DeviceDecidedUpdate:
        """MasterAdamW's update (one process) without waiting for the GPU: whether the loss or the gradient
        is non-finite, and the clipping coefficient, are computed on the device; the update's kernel then
        writes nothing, or scales the gradients, and moves the EMA in the same pass. The flags are read
        with the step's logs (train_step), and a skipped update's step counts given back then: so the
        host queues the whole step ahead of the GPU, which otherwise idles after each read while the host
        prepares the update (H100, session 13: 6-11 ms per update)."""
        flags = {"loss": ~torch.isfinite(loss.detach().float()).reshape(()),
                 "gradient": ~torch.isfinite(norm.detach().float()).reshape(())}
        limit = self.cfg.trainer.grad_clip
        # clip_grad_norm_'s coefficient, clamped to 1: below the limit each gradient is multiplied by exactly 1
        grad_scale = torch.clamp(limit / (norm.detach().float() + 1e-6), max=1.0) if limit > 0 else None
        counted = opt.step(grad_scale=grad_scale, ema=None if ema is None else (ema.by_parameter, ema.decay),
                           skip=flags["loss"] | flags["gradient"])
        opt.zero_grad(set_to_none=True)
        return DeviceDecidedUpdate(role, opt, counted, flags)

    def _say_skipped(self, role: str, step: int, bad_loss: bool) -> None:
        if self.world.is_main:
            where = "loss (dmd_op)" if role == "generator" and bad_loss else "loss" if bad_loss else \
                "gradient (backward)"
            tqdm.write(f"step {step}: non-finite {role} {where}; update skipped")

    @staticmethod
    def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The total gradient norm, on the device (under FSDP2 a DTensor, as clip_grads_with_norm_ wants it
        for DTensor gradients). A bf16 copy's gradients (perf.master_weights) are summed in fp32: a norm in
        bf16 would be off by up to 0.4%, and so would the clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads and all(type(g) is torch.Tensor and g.dtype in (torch.bfloat16, torch.float16) for g in grads):
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        return torch.nn.utils.get_total_norm(grads)

    def _clip(self, params: list[torch.nn.Parameter], norm: torch.Tensor, norm_value: float) -> None:
        """Scale the gradients to trainer.grad_clip only when their norm (nearly) exceeds it, and then
        by clip_grad_norm_'s own code, so the numbers are the same: the scaling reads and writes every
        gradient, which most steps need not pay. The margin covers the fp32 rounding of
        clip_grad_norm_'s coefficient (below it, the coefficient is clamped to 1). MasterAdamW scales in its
        update instead (_step_on_device)."""
        limit = self.cfg.trainer.grad_clip
        if limit > 0 and limit / (norm_value + 1e-6) < 1.0 + 1e-6:
            torch.nn.utils.clip_grads_with_norm_(params, limit, norm)

    # ----- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t, world = self.cfg, self.cfg.trainer, self.world
        if cfg.resume:
            self.resume()  # first: a resume with nothing to resume from must not create a run dir
        self.tensorboard = TensorBoardLog(t.tensorboard, os.path.join(self.run_dir, "tensorboard"),
                                          enabled=world.is_main, resume_step=self.step if cfg.resume else None)
        if world.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            write_atomically(os.path.join(self.run_dir, "config.json"), json.dumps(to_dict(cfg), indent=2))
            self._print_header()
        barrier(world)
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.profiler = StepProfiler(cfg.profile, self.run_dir, world.rank, world.device, self.step)
        if world.is_main:
            for note in self.profiler.notes:
                print(f"  {note}")
        bar = tqdm(total=t.steps, initial=self.step, desc=cfg.recipe, dynamic_ncols=True, disable=not world.is_main)
        # SIGTERM asks for a stop until the final checkpoint is written (one during that save no longer killed it)
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        try:
            try:
                finished = self._loop(bar, metrics_path)
            finally:  # an error then starts on a line of its own, not glued to the bar
                self.tensorboard.close()
                bar.close()
            if world.is_main and self.profiler.written:
                print("profile: " + ", ".join(self.profiler.written))
            self.save()
            finished = not self._stop_agreed() and finished  # a stop asked during the save skips the evaluation
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        if not finished:
            if world.is_main:
                print(f"stopped by SIGTERM after step {self.step}; checkpoint saved. Resume with:\n"
                      f"  {launch_command(world.world_size)} --resume --run_dir {self.run_dir}")
            return {}
        return self._final_evaluation() if cfg.eval.at_end else {}

    def _final_evaluation(self) -> dict:
        """A SIGTERM (a preemption notice) ends the evaluation, not the process: the checkpoint is complete, and
        a --resume at the last step evaluates it again. Under torchrun every rank is sent the signal."""
        def stop(signum, frame):
            raise _EvaluationStopped

        previous_handler = signal.signal(signal.SIGTERM, stop)
        try:
            return self.evaluate()
        except _EvaluationStopped:
            if self.world.is_main:
                print(f"\nstopped by SIGTERM during the final evaluation; the checkpoint of step {self.step} is "
                      f"complete. Evaluate it with:\n  {launch_command(self.world.world_size)} --resume --run_dir "
                      f"{self.run_dir}")
            return {}
        finally:
            signal.signal(signal.SIGTERM, previous_handler)

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        """All ranks stop after the same step, or the next collective would hang."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        if self.world.distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _loop(self, bar, metrics_path: str) -> bool:
        """Train to trainer.steps; False when SIGTERM cut it short."""
        t, world = self.cfg.trainer, self.world
        window, window_start = [], time.perf_counter()
        while self.step < t.steps:
            if self._stop_agreed():
                if window:
                    self._log(window, time.perf_counter() - window_start, metrics_path, bar)
                return False
            self.step += 1
            self.profiler.before_step(self.step)
            window.append(self.train_step(self.step))
            self.profiler.after_step(self.step)
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log(window, time.perf_counter() - window_start, metrics_path, bar)
                window, window_start = [], time.perf_counter()
            # the checkpoint first: a sample grid that fails (out of memory, say) then loses no training
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                self.save()
            if t.sample_every and self.step % t.sample_every == 0:
                self._sample_grid()
        return True

    def _log(self, window: list[dict], elapsed: float, metrics_path: str, bar) -> None:
        """One metrics.jsonl line per window: means across steps and ranks; skip and non-finite counts summed
        over the steps, non-finite counts over the ranks too."""
        t, world = self.cfg.trainer, self.world
        summed = ("skipped_", "nonfinite_")
        row = {k: float(np.sum([w[k] for w in window]) if k.startswith(summed) else np.mean([w[k] for w in window]))
               for k in window[0]}
        row = mean_across_ranks(row, world)
        # a non-finite count counts each rank's own samples: summed over ranks (the skip counts are every rank's
        # same decisions)
        row |= {k: v * world.world_size for k, v in row.items() if k.startswith("nonfinite_")}
        row |= {"step": self.step, "lr_generator": self.sched_g.get_last_lr()[0],
                "samples_per_s": len(window) * t.batch_size * world.world_size / elapsed}
        if world.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.tensorboard.write(row)
        shown = {"loss": row["loss_generator"]} | ({"critic": row["loss_critic"]} if "loss_critic" in row else {}) \
            | ({"reward": row["reward"]} if "reward" in row else {})
        bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()} | {"img_s": f"{row['samples_per_s']:.0f}"})

    def _print_header(self) -> None:
        c, p = self.cfg, self.cfg.perf
        n_params = sum(w.numel() for w in self.generator.parameters())
        print(f"fastdmd {c.recipe}: method={c.method} steps={c.trainer.steps} batch={c.trainer.batch_size}"
              f"x{self.world.world_size} ranks, guidance g={c.dmd.guidance_scale}, generator {n_params / 1e6:.2f}M params"
              + (f", GAN term (generator {c.dmd.gan_generator_weight}, critic {c.dmd.gan_critic_weight})" if self.use_gan else ""))
        print(f"  device={self.world.device} ops.backend={ops.resolve_backend(self.world.device)} "
              f"optimizer={self.optimizer_name} attention={self.attention} threads={torch.get_num_threads()} "
              f"run_dir={self.run_dir}")
        print(f"  metrics={os.path.join(self.run_dir, 'metrics.jsonl')} tensorboard={self.tensorboard.status}")
        if self.world.distributed:
            print("  weights: " + ("read by rank 0 alone and broadcast to the others (perf.load_on_rank0)"
                                   if p.load_on_rank0 else "read by every rank (perf.load_on_rank0 false)"))
        compile_desc = (f"per block ({p.compile_backend}" + (f", {p.compile_mode}" if p.compile_mode != "default" else "")
                        + (f", options {p.inductor_options}" if p.inductor_options else "") + ")")
        print(f"  compile={compile_desc if p.compile else 'off'} "
              f"activation_checkpointing={'per block' if p.activation_checkpointing else 'off'} "
              f"precision={p.mixed_precision} rollout={'CUDA graph' if self.rollout.active else self.rollout.reason}"
              + (", on a bf16 copy of the generator" if self.rollout_generator is not self.generator else "")
              + f" scores={self.scores_graphs} fused_qkv={self.fused_qkv} gelu_epilogue={self.gelu_epilogue}")
        if p.master_weights:
            trained = "generator and critic" if self.fake is not None else "generator"
            print(f"  weights: the {trained} compute on bf16 copies; MasterAdamW updates their fp32 weights from "
                  "the copies' bf16 gradients and writes the copies in the same pass (perf.master_weights)")
        if c.method != "dmd2":
            print(f"  reward={self.reward.name} critic={'yes' if self.fake is not None else 'no'}"
                  + (f" init_generator={c.model.init_generator}" if c.model.init_generator else ""))

    @property
    def scores_graphs(self) -> str:
        """How the DMD scores run: 'CUDA graph', or why not (per score where the two differ)."""
        reasons = {name: score.graphs.reason for name, score in (("real", self.real), ("fake", self.fake_compute))
                   if score is not None}
        if len(set(reasons.values())) == 1:
            return next(iter(reasons.values())) or "CUDA graph"
        return "; ".join(f"{name}: {reason or 'CUDA graph'}" for name, reason in reasons.items())

    # ----- evaluation ---------------------------------------------------------------------------
    # In one process the samplers run an unsharded, uncompiled copy of the generator. Under torchrun the
    # sharded networks themselves run, on every rank in lockstep (each forward all-gathers: a rank that
    # sat out would leave the others waiting): grids on each rank's share of the samples, the digits FD
    # evaluation whole on every rank; rank 0 alone writes and prints.
    def _plain_generator(self) -> Generator:
        if self.ema is not None:
            self.ema.swap(self.generator)
        state = get_model_state_dict(self.generator.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # In one process the state dict shares storage with the live weights: copy before swapping back.
        state = {k: v.clone() for k, v in state.items()}
        if self.ema is not None:
            self.ema.swap(self.generator)
        net = self.family.build_net()
        if self.world.is_main:
            net.load_state_dict(state)
        return Generator(net.eval().to(self.world.device), self.adapter)

    @contextlib.contextmanager
    def _eval_generator(self):
        """The generator the samplers use, with the EMA weights where kept: a plain copy in one process,
        the sharded generator with the EMA weights swapped in under torchrun."""
        if not self.world.distributed:
            yield self._plain_generator()
            return
        if self.ema is not None:
            self.ema.swap(self.generator)
        try:
            with torch.no_grad():
                yield self.generator
        finally:
            if self.ema is not None:
                self.ema.swap(self.generator)

    def _shared_sampling(self, sample, noise: torch.Tensor, labels: torch.Tensor,
                         draws: Sequence[torch.Tensor] = (), chunk: int = 0) -> torch.Tensor | None:
        """sample(noise, labels, draws) over the grid's samples (`draws`: per-sample tensors drawn for the
        whole grid, e.g. the sampler's re-noise), in calls of at most `chunk` samples (0: one call). Under
        torchrun each rank takes every world-size-th row of each, so the samples are the ones one process
        draws, and rank 0 gathers them back in order (None on the others). Every rank calls the sharded
        networks the same number of times: a share one short of the largest repeats its last row, dropped
        after. A grid with fewer samples than ranks is drawn whole by every rank."""
        world = self.world
        if not world.distributed or len(noise) < world.world_size:
            return _in_chunks(sample, noise, labels, draws, chunk)
        r, n = world.rank, world.world_size
        rows = torch.arange(r, len(noise), n)
        padded = torch.cat([rows, rows[-1:].expand(-(-len(noise) // n) - len(rows))])
        mine = _in_chunks(sample, noise[padded], labels[padded], [d[padded] for d in draws], chunk)[:len(rows)].cpu()
        parts = [None] * n if world.is_main else None
        torch.distributed.gather_object(mine, parts, dst=0)
        if not world.is_main:
            return None
        whole = torch.empty((len(noise), *mine.shape[1:]), dtype=mine.dtype)
        for i, part in enumerate(parts):
            whole[i::n] = part
        return whole.to(noise.device)

    def _student_grid(self, gen: Generator, noise: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor | None:
        """The few-step sampler over the grid, its re-noise drawn from `seed` (rank 0's result; see
        _shared_sampling)."""
        sigmas = self.cfg.dmd.generator_sigmas
        draws = renoise_draws(noise, len(sigmas) - 1, torch.Generator().manual_seed(seed))
        return self._shared_sampling(lambda z, y, d: sample_with_draws(gen, z, y, sigmas, d), noise, labels, draws,
                                     self.cfg.eval.batch_size)

    def _decode(self, samples: torch.Tensor) -> torch.Tensor:
        """family.decode in eval.batch_size pieces: a VAE decode at full resolution is the largest activation."""
        return torch.cat([self.family.decode(part) for part in samples.split(self.cfg.eval.batch_size)])

    def _sample_grid(self) -> None:
        noise, labels = self._grid_inputs()
        with self._eval_generator() as gen:
            samples = self._student_grid(gen, noise, labels, seed=0)
        if self.world.is_main:
            os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
            save_grids({f"student {len(self.cfg.dmd.generator_sigmas)}-step, step {self.step}":
                        (self._decode(samples), labels.cpu())},
                       os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png"))
        barrier(self.world)

    def evaluate(self) -> dict:
        with self._eval_generator() as gen:
            summary = self._evaluate_digits(gen) if self.classifier is not None else self._evaluate_samples(gen)
        barrier(self.world)
        return summary if self.world.is_main else {}

    def _evaluate_digits(self, gen: Generator) -> dict:
        e, g = self.cfg.eval, self.cfg.dmd.guidance_scale
        n_steps = len(self.cfg.dmd.generator_sigmas)
        real_v = lambda x, s, y: self.real.velocity(x, s, y, g)  # noqa: E731
        samplers = {
            f"teacher {e.teacher_steps}-step Euler": (
                lambda z, y: euler_sample(lambda x, s: real_v(x, s, y), z, linear_sigmas(e.teacher_steps)), True),
            f"teacher {n_steps}-step Euler": (
                lambda z, y: euler_sample(lambda x, s: real_v(x, s, y), z, linear_sigmas(n_steps)), True),
            f"student {n_steps}-step": (
                lambda z, y: few_step_sample(gen, z, y, self.cfg.dmd.generator_sigmas, torch.Generator().manual_seed(e.seed)),
                False),
        }
        main = self.world.is_main
        rows, panels = {}, {}
        for name, (fn, is_teacher) in tqdm(samplers.items(), desc="evaluate", dynamic_ncols=True, disable=not main):
            cached = self._teacher_cache(name) if is_teacher and e.cache_teacher else None
            if broadcast_object(bool(cached) and os.path.exists(cached), self.world):  # every rank skips, or none
                noise, labels = self._grid_inputs()
                panels[name] = (fn(noise, labels), labels)
                if main:
                    with open(cached) as f:
                        rows[name] = json.load(f) | {"cached": True}
                continue
            score, images, labels = score_sampler(fn, self.classifier, self.test_set.images, e.num_samples,
                                                   e.batch_size, e.seed, self._eval_rewards())
            rows[name] = score.as_dict()
            panels[name] = (images, labels)
            if cached and main:
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                write_atomically(cached, json.dumps(rows[name]))
        if not main:
            return {}
        rows["real digits (train split, the floor)"] = self._real_floor()
        save_grids(panels, os.path.join(self.run_dir, "samples_final.png"))
        summary = {"recipe": self.cfg.recipe, "steps": self.step, "guidance_scale": g,
                   "num_samples": e.num_samples, "samplers": rows,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # whole files or none: a SIGTERM in the final evaluation may come while they are written
        write_atomically(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))
        table = summary_table(summary)
        write_atomically(os.path.join(self.run_dir, "summary.md"), table + "\n")
        print("\n" + table)
        print(f"\nrun directory: {self.run_dir}  (samples_final.png, metrics.jsonl, checkpoints/)")
        return summary

    def _evaluate_samples(self, gen: Generator) -> dict:
        """Families without a metric model (SD3): teacher and student grids on the same noise, student speed."""
        e, g, fam = self.cfg.eval, self.cfg.dmd.guidance_scale, self.family
        noise, labels = self._grid_inputs()
        n = self.world.world_size
        share = len(noise[::n]) if self.world.distributed and len(noise) >= n else len(noise)  # rank 0's
        start = time.perf_counter()
        student = self._student_grid(gen, noise, labels, e.seed)
        if noise.is_cuda:
            torch.cuda.synchronize(noise.device)
        speed = share / (time.perf_counter() - start)  # per rank (rank 0's share, with the gather)
        teacher = self._shared_sampling(lambda z, y, d: euler_sample(
            lambda x, s: self.real.velocity(x, s, y, g), z, linear_sigmas(e.teacher_steps)), noise, labels,
            chunk=e.batch_size)
        if not self.world.is_main:
            return {}
        n_steps = len(self.cfg.dmd.generator_sigmas)
        save_grids({f"teacher {e.teacher_steps}-step Euler": (self._decode(teacher), labels.cpu()),
                    f"student {n_steps}-step": (self._decode(student), labels.cpu())},
                   os.path.join(self.run_dir, "samples_final.png"))
        summary = {"recipe": self.cfg.recipe, "steps": self.step, "guidance_scale": g, "family": fam.name,
                   "student_samples_per_s": speed, "rows": {str(i): fam.condition_names[i] for i in sorted(set(labels.tolist()))},
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_atomically(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))
        per = "GPU" if noise.is_cuda else "process"
        print(f"\nstudent {n_steps}-step: {speed:.1f} samples/s per {per}; grids (rows = prompts {summary['rows']}) in "
              f"{self.run_dir}/samples_final.png")
        return summary

    def _real_floor(self) -> dict:
        """FD and accuracy of real train digits against the held-out ones: what a perfect sampler scores."""
        e = self.cfg.eval
        train = load_digits("train")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(e.seed))
        by_class = [order[train.labels[order] == c] for c in range(NUM_CLASSES)]
        taken = [0] * NUM_CLASSES

        def real_digits(noise, labels):
            picks = []
            for y in labels.tolist():
                picks.append(by_class[y][taken[y]])
                taken[y] += 1
            return train.images[torch.stack(picks)]

        score, _, _ = score_sampler(real_digits, self.classifier, self.test_set.images, e.num_samples, e.batch_size,
                                    e.seed, self._eval_rewards())
        return score.as_dict() | {"samples_per_s": None}

    def _eval_rewards(self) -> dict:
        """The rewards every summary reports: prompt alignment and compressibility (aesthetic-like)."""
        return {"classifier_log_prob": ClassifierLogProb(self.classifier), "jpeg": JpegCompressibility()}

    def _grid_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        conditions = min(self.family.num_conditions, 10)
        labels = torch.arange(10 * conditions) % conditions
        noise = torch.randn((len(labels), *self.family.sample_shape), generator=torch.Generator().manual_seed(self.cfg.eval.seed))
        return noise.to(self.world.device), labels.to(self.world.device)

    def _teacher_cache(self, name: str) -> str:
        e = self.cfg.eval
        digest = hashlib.sha256()
        with open(self.family.teacher_file, "rb") as f:
            digest.update(f.read())
        digest.update(json.dumps([EVAL_VERSION, name, self.cfg.dmd.guidance_scale, e.num_samples, e.batch_size, e.seed,
                                  torch.__version__, self.cfg.model.dtype, self.cfg.perf.mixed_precision,
                                  self.world.world_size]).encode())
        root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        return os.path.join(root, "fastdmd", "teacher_eval", digest.hexdigest()[:24] + ".json")


def _in_chunks(sample, noise: torch.Tensor, labels: torch.Tensor, draws: Sequence[torch.Tensor], chunk: int):
    """sample(noise, labels, draws) in calls of at most `chunk` rows (0: one call), concatenated."""
    if not chunk or len(noise) <= chunk:
        return sample(noise, labels, draws)
    return torch.cat([sample(noise[i:i + chunk], labels[i:i + chunk], [d[i:i + chunk] for d in draws])
                      for i in range(0, len(noise), chunk)])


def summary_table(summary: dict) -> str:
    lines = [f"| sampler (g = {summary['guidance_scale']}) | FD (lower is better) | class accuracy "
             f"| log p(label) | JPEG score | samples/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in summary["samplers"].items():
        note = " (cached)" if r.get("cached") else ""
        speed = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.0f}{note}"
        rewards = r.get("rewards", {})
        cols = [f"{rewards[k]:.3f}" if k in rewards else "-" for k in ("classifier_log_prob", "jpeg")]
        lines.append(f"| {name} | {r['fd']:.4f} | {r['accuracy']:.3f} | {' | '.join(cols)} | {speed} |")
    return "\n".join(lines)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the log reads as one run; a torn last
    line (a write cut short by a full disk) goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", math.inf) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
    write_atomically(path, "".join(kept))
