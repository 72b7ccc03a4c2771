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
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


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


def init_world() -> World:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(use_cuda))
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
        for block in blocks:
            block.compile(backend=perf.compile_backend, mode=mode, dynamic=False)  # static shapes: no symbolic recompiles
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
    whole = {}  # rank 0's whole weights, kept until they have filled every rank's shards
    if from_rank0 and world.is_main:
        whole = {"net": net.state_dict()} | ({"extra": extra.state_dict()} if extra is not None else {})
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(net, **(root_kwargs or kwargs))
    if extra is not None:
        fully_shard(extra, **kwargs)
    if from_rank0:
        fill_from_rank0(net, world, whole.pop("net", {}))
        if extra is not None:
            fill_from_rank0(extra, world, whole.pop("extra", {}))
    return net


def fill_from_rank0(module: nn.Module, world: World, whole: dict[str, torch.Tensor]) -> None:
    """Give every rank rank 0's weights: `whole` is rank 0's whole state dict ({} on the other ranks,
    whose `module`, sharded or not, may still be on the meta device). Tensors go out one at a time
    (torch.distributed.checkpoint's broadcast_from_rank0), so no rank ever holds a second whole copy;
    buffers left out of state dicts (non-persistent) are broadcast as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not world.is_main:
        module.to_empty(device=world.device)
    # The broadcast checks shapes but would convert dtypes: a rank that built the network otherwise
    # (say bf16 against rank 0's fp32) must fail here, every rank with it (none is left waiting).
    dtypes = broadcast_object({name: p.dtype for name, p in module.named_parameters()}, world)
    wrong = {name: (p.dtype, dtypes.get(name)) for name, p in module.named_parameters() if dtypes.get(name) != p.dtype}
    failed = torch.tensor([float(bool(wrong))])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise RuntimeError(f"rank {world.rank} built {type(module).__name__} unlike rank 0 (name: this rank's dtype, "
                           f"rank 0's): {dict(list(wrong.items())[:4])}" if wrong else
                           f"another rank built {type(module).__name__} unlike rank 0 (its error says how); stopping too")
    set_model_state_dict(module, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for owner in module.modules():
        for name in owner._non_persistent_buffers_set:
            if owner._buffers.get(name) is not None:
                dist.broadcast(owner._buffers[name], src=0)


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
