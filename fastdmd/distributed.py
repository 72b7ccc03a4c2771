"""Process groups and FSDP2 wrapping.

`python -m fastdmd.train` runs as one process; under `torchrun` each rank joins a process group
(nccl for CUDA tensors, with gloo beside it for the few CPU tensors the trainer reduces: the
non-finite flags, the stop flag, the logged metrics; gloo alone on CPU), draws its own labels and
noise from (seed, rank, step), and shards the networks with FSDP2: `fully_shard` per block, then the
root. Rank 0 alone logs and writes files; every rank takes part in collectives (checkpoints, the
sharded networks' forwards during evaluation).
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from fastdmd.config import parse_inductor_options
from fastdmd.rollout.graphs import add_twin


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(collective_timeout_s: float) -> World:
    """The process group of a torchrun launch (one process: none). A collective that waits past
    `collective_timeout_s` for a rank fails instead of hanging (NCCL's own default is 10 minutes, which rank 0
    reading a FLUX-sized checkpoint alone from slow storage can outlast)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(use_cuda), timeout=timedelta(seconds=collective_timeout_s))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def process_group_backend(use_cuda: bool) -> str:
    """nccl alone serves CUDA tensors only: an all_reduce of a CPU tensor would fail at the first step."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def blocks_of(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers network: UNet down/mid/up blocks, SD3 / FLUX transformer blocks."""
    blocks = [*getattr(net, "down_blocks", []), *getattr(net, "up_blocks", []),
              *getattr(net, "transformer_blocks", []), *getattr(net, "single_transformer_blocks", [])]
    if getattr(net, "mid_block", None) is not None:
        blocks.append(net.mid_block)
    return blocks


def parallelize(net: nn.Module, world: World, perf=None, extra: nn.Module | None = None, trainable: bool = True,
                from_rank0: bool = False) -> nn.Module:
    """Apply, in this order (torchtitan's): activation checkpointing per block (trainable networks),
    torch.compile per block, then under torchrun FSDP2 `fully_shard` per block, the network and
    `extra` (a module called beside the network, e.g. the critic's GAN head: a unit of its own, so that
    its own forward gathers its weights),
    with a MixedPrecisionPolicy (bf16 params, fp32 gradient reduction) when perf.mixed_precision is bf16.
    `from_rank0`: rank 0's weights are the real ones (the other ranks' may be on the meta device); after
    sharding, every rank's shards are filled from them (fill_from_rank0)."""
    blocks = blocks_of(net)
    if perf is not None and perf.activation_checkpointing and trainable and \
            getattr(net, "_supports_gradient_checkpointing", False):
        net.enable_gradient_checkpointing()
    if perf is not None and perf.compile:
        mode = None if perf.compile_mode == "default" else perf.compile_mode
        if mode == "reduce-overhead" and (world.device.type != "cuda" or world.distributed):
            raise ValueError(f"perf.compile_mode = 'reduce-overhead' replays the compiled blocks from CUDA graphs: it "
                             f"needs a CUDA device (this run is on {world.device.type}) and one process (FSDP2's "
                             f"all-gathers run outside any graph; world size {world.world_size}); use perf.compile_mode "
                             f"default")
        # Each role (teacher, generator, critic, the rollout's bf16 copy) at each batch shape, dtype and grad
        # mode compiles its own variant of the same block code; past dynamo's default of 8 per code object
        # the rest would run eagerly, with only a log line to say so.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # torch.compile takes a mode or options, not both: with perf.inductor_options the mode goes in as its options
        options = parse_inductor_options(perf.inductor_options)
        if options:
            from torch._inductor import list_mode_options
            compile_args = dict(options={**(list_mode_options(mode) if mode else {}), **options})
        else:
            compile_args = dict(mode=mode)
        for block in blocks:
            block.compile(backend=perf.compile_backend, dynamic=False, **compile_args)  # static shapes: no symbolic recompiles
            if mode == "reduce-overhead":  # the whole-call CUDA graphs (rollout, DMD scores) capture its twin
                add_twin(block, perf.compile_backend, options)
    if not world.distributed:
        return net
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs, root_kwargs = {}, {}
    if perf is not None and perf.mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The network's own inputs are cast by cast_inputs_except_time, not by FSDP, which would cast them all.
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                        cast_forward_inputs=False)
        net.register_forward_pre_hook(cast_inputs_except_time(torch.bfloat16), with_kwargs=True)
    units = [net] + ([extra] if extra is not None else [])
    # FSDP2 warns when a unit returns a view: an in-place op on it would skip the unit's pre-backward hook.
    # FLUX's single-stream blocks return slices of their output and FLUX's root a Linear's output (a view of
    # the 2-D matmul); nothing writes into them in place (diffusers 0.42: the next block concatenates them,
    # norm_out and the adapter's unpacking read them), so the warning, which every rank prints, is noise there.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPFlux(SingleTransformerBlock|"
                            r"Transformer2DModel)\) returned a view tensor", category=UserWarning)
    # from_rank0: rank 0 keeps its whole weights (host memory) and puts its networks on the meta device
    # too, so that every rank shards, allocates (to_empty) and fills its shards the same way.
    whole = [unit.state_dict() | non_persistent_buffers(unit) if world.is_main else {} for unit in units] \
        if from_rank0 else []
    if from_rank0 and world.is_main:
        for unit in units:
            unit.to(device="meta")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(net, **(root_kwargs or kwargs))
    if extra is not None:
        fully_shard(extra, **kwargs)
    for unit, state in zip(units, whole):
        fill_from_rank0(unit, world, state)
    return net


def fill_from_rank0(module: nn.Module, world: World, whole: dict[str, torch.Tensor] | None = None) -> None:
    """Give every rank rank 0's weights. An FSDP2-sharded `module` (on the meta device on every rank):
    `whole` is rank 0's whole state dict and non-persistent buffers ({} on the others); each rank
    allocates its shards, then
    torch.distributed.checkpoint's broadcast_from_rank0 sends the tensors one at a time, so no rank
    holds a second whole copy. A module without FSDP2 units: rank 0's, already on its device, is
    broadcast tensor by tensor into the others' (`whole` unused). First, every rank checks that it built the module as
    rank 0 did (names, shapes, dtypes): a mismatch stops every rank with a message, none left waiting."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    sharded = any(isinstance(m, FSDPModule) for m in module.modules())
    if sharded or not world.is_main:
        module.to_empty(device=world.device)
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    layout = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    rank0_layout = broadcast_object(layout, world)
    wrong = sorted(set(layout) ^ set(rank0_layout)) + \
        [f"{name}: {layout[name]} here, {rank0_layout[name]} on rank 0" for name in layout
         if name in rank0_layout and layout[name] != rank0_layout[name]]
    stop_together(f"rank {world.rank} built {type(module).__name__} unlike rank 0 (names only one has, or "
                  f"shape and dtype): {wrong[:4]}" if wrong else None, world)
    with torch.no_grad():
        if sharded:
            whole = whole or {}
            loose = non_persistent_buffers(module)  # not in state dicts: copied and broadcast as they are
            set_model_state_dict(module, {k: v for k, v in whole.items() if k not in loose},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            for name, buf in loose.items():
                if world.is_main:
                    buf.copy_(whole[name])
                dist.broadcast(buf, src=0)
        else:
            for t in tensors.values():
                dist.broadcast(t, src=0)


def non_persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: buffer} of the buffers that state dicts leave out."""
    return {f"{prefix}.{name}".lstrip("."): owner._buffers[name] for prefix, owner in module.named_modules()
            for name in owner._non_persistent_buffers_set if owner._buffers.get(name) is not None}


def stop_together(error: str | BaseException | None, world: World) -> None:
    """Raise on every rank if any rank has an error (this rank's, or None): a rank that stopped alone
    would leave the others waiting in their next collective. The failing rank raises its own error."""
    failed = torch.tensor([0.0 if error is None else 1.0])
    if world.distributed:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if isinstance(error, BaseException):
        raise error
    if error:
        raise RuntimeError(error)
    if failed.item():
        raise RuntimeError("another rank failed (its error says why); stopping too")


TIME_INPUTS = ("timestep", "timesteps", "guidance")


def cast_inputs_except_time(dtype: torch.dtype):
    """A forward pre-hook casting a network's floating-point inputs to `dtype`, all but the diffusion
    time (and FLUX's guidance), which the network itself turns into sinusoidal embeddings: SD3 and the
    UNets do so in fp32 (in bf16 SD3's t = 1000 sigma would move to a multiple of 4 near 1000, 749 ->
    748, off x_t's noise level and off what the pipeline feeds at inference; one-process autocast
    keeps them fp32 too); FLUX casts them to its compute dtype itself, as at inference."""
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name not in TIME_INPUTS and torch.is_tensor(value) and value.is_floating_point():
                bound.arguments[name] = value.to(dtype)
        return bound.args, bound.kwargs

    return hook


def reshard(module: nn.Module) -> None:
    """Put every FSDP2-sharded part of `module` back in its sharded form. FSDP2 leaves the root's
    parameters unsharded (plain tensors) after a forward without grad, since no backward comes to
    reshard them; code that works on the parameters as DTensors (EMA) calls this first."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def mean_across_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    if not world.distributed or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / world.world_size).tolist()))


def broadcast_object(obj, world: World):
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
