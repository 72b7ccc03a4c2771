"""Per-rank memory plan of a DMD2 run: `python -m fastdmd.memory_plan --preset sd3-medium --batch 4
--resolution 512 --world-size 8 --precision bf16 --activation-checkpointing`.

What it counts, per rank (W ranks, FSDP2 shards everything that is sharded evenly):
- generator: fp32 master weights, AdamW's fp32 second moment, the fp32 EMA: 12 B/param / W
- critic: weights and AdamW's second moment: 8 B/param / W (a LoRA critic: its adapters only)
  At DMD2's beta1 = 0 the fused optimizers (NoMomentumAdamW, MasterAdamW) keep no first moment;
  --adam-first-moment counts it (4 B/param more each): torch's unfused AdamW
  (perf.fused_optimizer false, the naive benchmark step's) or beta1 > 0
- gradients: fp32, of one network at a time (the generator's are freed before the critic's
  backward, zero_grad(set_to_none=True)): 4 B/param of the larger / W; bf16 (2 B/param) with
  --master-weights, whose MasterAdamW reads the bf16 copies' gradients as they are
- teacher: frozen weights in the teacher dtype / W (or whole when not sharded)
- FSDP working set: the largest block unsharded twice (current + prefetched), in the compute dtype
- autocast weight copies (bf16, one process): the bf16 casts of the fp32 weights that autocast
  keeps for backward, 2 B/param; with --rollout-weights bf16, the rollout's bf16 generator copy,
  2 B/param more
- activations: the bytes autograd saves for backward in one generator (or critic) forward at the
  per-rank batch, measured by running the real network on the meta device (no memory, exact shapes)
  under saved-tensor hooks, each storage counted once, attention counted as a fused kernel saves
  it (q, k, v, output, log-sum-exp; not the L x L probabilities of the math path that the meta
  device takes); with activation checkpointing, what stays saved plus the largest block's
  recompute. Weights saved by layers are not counted.
Not counted: the CUDA context and allocator fragmentation (typically 1-3 GB), the no-grad teacher
and critic forwards' transient buffers, the rollout. Checked on an H100 (SD3-medium shape, depth 12,
batch 4, 512 px, one process, bf16): see benchmarks/results/memory_plan_sd3_medium_d12.md.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn as nn

from fastdmd.distributed import blocks_of

GiB = 2**30


@dataclass
class Plan:
    params: int
    critic_params: int
    items: dict[str, float]   # bytes per rank
    gpu_bytes: float
    startup_host_bytes: float = 0.0  # rank 0 under torchrun: the whole networks, before fully_shard

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    def table(self) -> str:
        lines = [f"| part | GiB per rank |", "|---|---:|"]
        lines += [f"| {name} | {value / GiB:.2f} |" for name, value in self.items.items()]
        lines.append(f"| **total** | **{self.total / GiB:.2f}** |")
        verdict = "fits" if self.fits else "does NOT fit"
        text = "\n".join(lines) + f"\n\n{self.params / 1e6:.1f}M generator parameters; {verdict} in " \
                                  f"{self.gpu_bytes / GiB:.0f} GiB (plus 1-3 GB of CUDA context not counted)"
        if self.startup_host_bytes:
            text += (f"\nstart-up: {self.startup_host_bytes / GiB:.1f} GiB of host memory on rank 0 (the teacher and "
                     f"whole fp32 generator and critic copies, until their shards are sent to every rank's GPU); the "
                     f"other ranks build the networks on the meta device and hold none of it (perf.load_on_rank0; "
                     f"with it off, every rank holds as much as rank 0)")
        return text


def build_meta_network(preset: str, depth: int | None, model_path: str = ""):
    """(network on the meta device, example-input function (batch, resolution) -> kwargs)."""
    from fastdmd.models.family import FLUX_DEV, PROMPT_TOKENS, SD3_MEDIUM

    if preset == "digits":
        from fastdmd.models.digits import build_digits_unet
        with torch.device("meta"):
            net = build_digits_unet()

        def inputs(batch, resolution, dtype):
            return {"sample": torch.randn(batch, 1, 16, 16, device="meta", dtype=dtype),
                    "timestep": torch.ones(batch, device="meta"),
                    "class_labels": torch.zeros(batch, dtype=torch.long, device="meta")}
        return net, inputs
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if model_path:
        cls = SD3Transformer2DModel if preset == "sd3-medium" else FluxTransformer2DModel
        config = dict(cls.load_config(model_path, subfolder="transformer"))
    else:
        config = dict(SD3_MEDIUM if preset == "sd3-medium" else FLUX_DEV)
    if depth:
        config["num_layers"] = depth
        if preset == "flux-dev":
            config["num_single_layers"] = 2 * depth
    tokens = PROMPT_TOKENS[preset]
    with torch.device("meta"):
        if preset == "sd3-medium":
            net = SD3Transformer2DModel.from_config(config)
        else:
            net = FluxTransformer2DModel.from_config(config)

    def inputs(batch, resolution, dtype):
        size = resolution // 8
        text = torch.randn(batch, tokens, net.config.joint_attention_dim, device="meta", dtype=dtype)
        pooled = torch.randn(batch, net.config.pooled_projection_dim, device="meta", dtype=dtype)
        if preset == "sd3-medium":
            return {"hidden_states": torch.randn(batch, net.config.in_channels, size, size, device="meta", dtype=dtype),
                    "encoder_hidden_states": text, "pooled_projections": pooled,
                    "timestep": torch.ones(batch, device="meta")}
        seq = (size // 2) ** 2
        return {"hidden_states": torch.randn(batch, seq, net.config.in_channels, device="meta", dtype=dtype),
                "encoder_hidden_states": text, "pooled_projections": pooled, "timestep": torch.ones(batch, device="meta"),
                "img_ids": torch.zeros(seq, 3, device="meta", dtype=dtype),
                "txt_ids": torch.zeros(tokens, 3, device="meta", dtype=dtype),
                "guidance": torch.ones(batch, device="meta") if net.config.guidance_embeds else None}
    return net, inputs


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, cuDNN, memory-efficient) keeps for backward."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the plan only counts
        raise NotImplementedError


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


def saved_activation_bytes(net: nn.Module, kwargs: dict, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for backward in one forward of `net`: each saved storage once, weights
    excluded, attention as a fused kernel keeps it. On the meta device nothing is allocated."""
    params = {id(p) for p in net.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            saved.setdefault(id(base), base)  # kept alive here, so ids stay unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention):
        net(**kwargs)
    return sum(t.untyped_storage().nbytes() for t in saved.values())


def plan(preset: str, batch: int, resolution: int, world_size: int, precision: str, checkpointing: bool,
         gpu_gib: float, depth: int | None = None, teacher_dtype: str = "bfloat16", shard_teacher: bool = True,
         critic_lora_params: int = 0, model_path: str = "", rollout_copy: bool = False,
         master_weights: bool = False, first_moment: bool = False) -> Plan:
    from fastdmd.models.family import cast_network

    net, make_inputs = build_meta_network(preset, depth, model_path)
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    cast_network(net, compute).requires_grad_(True)  # as FSDP2's MixedPrecisionPolicy runs it: compute-dtype weights
    params = sum(p.numel() for p in net.parameters())
    blocks = blocks_of(net)
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=params)
    shard = 1 / world_size
    teacher_bytes = {"bfloat16": 2, "float32": 4}[teacher_dtype]
    critic_params = critic_lora_params or params
    adamw = "AdamW" if first_moment else "AdamW (exp_avg_sq only)"
    moments = 8 if first_moment else 4
    items = {
        f"generator weights + {adamw} + EMA (fp32)": (8 + moments) * params * shard,
        f"critic weights + {adamw} (fp32)": (4 + moments) * critic_params * shard + (teacher_bytes * params * shard
                                                                                   if critic_lora_params else 0),
        f"gradients of one network ({'bf16' if master_weights else 'fp32'})":
            (2 if master_weights else 4) * max(params, critic_params) * shard,
        f"teacher ({teacher_dtype})": teacher_bytes * params * (shard if shard_teacher else 1),
        "FSDP unsharded working set (2 blocks)": 2 * largest_block * compute.itemsize if world_size > 1 else 0,
        "autocast weight copies (bf16, one process)": 2 * params if precision == "bf16" and world_size == 1
        and not master_weights else 0,
    }
    if rollout_copy:
        items["rollout's bf16 generator copy (perf.rollout_weights bf16)"] = 2 * params
    if master_weights:
        # Whole bf16 networks (a LoRA critic's copy holds its frozen base too); their gradients are counted above.
        items["bf16 compute copies of generator and critic (perf.master_weights)"] = 2 * params + 2 * params
    kwargs = make_inputs(batch, resolution, compute)
    full = saved_activation_bytes(net, kwargs, compute)
    if checkpointing and getattr(net, "_supports_gradient_checkpointing", False):
        net.enable_gradient_checkpointing()
        kept = saved_activation_bytes(net, kwargs, compute)
        per_block = (full - kept) / max(1, len(blocks))
        items["activations (checkpointed: kept + one block recomputed)"] = kept + per_block
    else:
        items["activations (generator or critic forward + backward)"] = full
    startup = (teacher_bytes * params + 4 * params + 4 * critic_params) if world_size > 1 else 0.0
    return Plan(params, critic_params, items, gpu_gib * GiB, startup)


def main(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(prog="python -m fastdmd.memory_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd3-medium", choices=("digits", "sd3-medium", "flux-dev"))
    p.add_argument("--model-path", default="", help="read the transformer config from this diffusers directory")
    p.add_argument("--depth", type=int, default=None, help="transformer blocks (default: the model's own; flux-dev: "
                   "double-stream blocks, with twice as many single-stream)")
    p.add_argument("--batch", type=int, default=4, help="samples per rank")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--teacher-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--rollout-weights", default="master", choices=("master", "bf16"),
                   help="perf.rollout_weights: bf16 adds the rollout's bf16 copy of the generator")
    p.add_argument("--adam-first-moment", action="store_true",
                   help="count AdamW's exp_avg: torch's unfused AdamW (perf.fused_optimizer false, the naive "
                        "benchmark step's) or trainer.adam_beta1 > 0; at DMD2's 0 the fused optimizers keep none")
    p.add_argument("--master-weights", action="store_true",
                   help="perf.master_weights: bf16 compute copies of the generator and critic (one process, bf16) "
                        "instead of autocast's weight copies")
    args = p.parse_args(argv)
    if args.world_size < 1 or args.batch < 1 or args.resolution < 16:
        p.error(f"need --world-size >= 1, --batch >= 1, --resolution >= 16; got {args.world_size}, {args.batch}, "
                f"{args.resolution}")
    if args.depth is not None and args.depth < 1:
        p.error(f"--depth {args.depth}: give a number of blocks >= 1, or leave it out for the model's own depth")
    if args.preset == "digits" and args.model_path:
        p.error("--model-path reads an SD3 or FLUX transformer's config; the digits preset has none")
    if args.model_path and not os.path.isfile(os.path.join(args.model_path, "transformer", "config.json")):
        p.error(f"--model-path {args.model_path}: no transformer/config.json there; expected a local diffusers "
                f"directory (as the pipeline's save_pretrained writes it)")
    if args.master_weights and (args.world_size > 1 or args.precision != "bf16" or args.rollout_weights == "bf16"):
        p.error(f"--master-weights is one process in bf16 with the rollout on the generator's copy: got "
                f"--world-size {args.world_size}, --precision {args.precision}, --rollout-weights {args.rollout_weights}")
    result = plan(args.preset, args.batch, args.resolution, args.world_size, args.precision,
                  args.activation_checkpointing, args.gpu_memory, args.depth, args.teacher_dtype,
                  model_path=args.model_path, rollout_copy=args.rollout_weights == "bf16",
                  master_weights=args.master_weights, first_moment=args.adam_first_moment)
    print(f"memory plan: {args.preset}" + (f" depth {args.depth}" if args.depth else "") +
          f", batch {args.batch}/rank" + ("" if args.preset == "digits" else f", {args.resolution}px") +
          f", {args.world_size} rank(s), {args.precision}, "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}\n")
    print(result.table())
    return result


if __name__ == "__main__":
    main()
