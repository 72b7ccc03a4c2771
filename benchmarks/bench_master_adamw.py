"""Benchmark of MasterAdamW's fused update (fastdmd/ops/master_adamw_triton.py): one AdamW step of fp32
master weights from bf16 gradients that also writes the bf16 compute copy and moves the EMA, on the
parameter list of a real network (--full: the SD3-medium transformer at depth 12, 1.0 B parameters in
about 490 tensors; --small: a few MB), against the same update done by separate torch ops.

Rows, each on the same tensors in one process:
    reference_eager     fastdmd.ops.reference.master_adamw_ (per tensor, unfused torch ops)
    torch_separate      what perf.master_weights ran before the fused update: the bf16 gradients cast
                        to fp32, torch's fused AdamW (torch._fused_adamw_), the copies refilled
                        (_foreach_copy_) and the EMA moved (_foreach_lerp_)
    torch_fused_adamw   torch._fused_adamw_ on fp32 gradients alone (no copy, no EMA): the floor of
                        torch's own optimizer, for scale
    triton              the fused update as MasterAdamW runs it (CUDA only): no exp_avg kept
    triton_exp_avg      the same, also writing exp_avg (the gradient), as for a torch AdamW state: 4 B more
Adam's beta1 is 0, as in DMD2 and fastdmd's default (trainer.adam_beta1), so the first moment is the
gradient itself, and MasterAdamW keeps none. Bytes the update must move, per parameter: read master 4,
grad 2, exp_avg_sq 4, EMA 4; write master 4, exp_avg_sq 4, copy 2, EMA 4: 28 B. GB/s and the fraction of
the copy bandwidth measured in the same run are on those bytes for every row, whatever a row moves itself
(its notes list each row's own bytes). (Before 2026-11-27's session 15
MasterAdamW kept exp_avg and the bench counted 32 B; before 2026-11-26's session 12 it ran beta1 = 0.9
and counted 36 B, exp_avg read.)

    python benchmarks/bench_master_adamw.py      # --full with CUDA, --small without
"""

import torch

from _bench_common import (TRITON_ON_CPU_NOTE, copy_bandwidth, environment, measure, parse_args, report,
                           write_results)
from fastdmd.ops import reference

BYTES_PER_PARAM = 28
HYPER = dict(lr=1e-5, beta1=0.0, beta2=0.99, eps=1e-8, weight_decay=0.01)
EMA_WEIGHT = 0.01
STEP = 10


def parameter_shapes(small: bool) -> tuple[str, list[tuple[int, ...]]]:
    if small:
        return "synthetic 2.1M", [(512, 512)] * 8 + [(512,)] * 8 + [(3, 7)] + [(1,)]
    from fastdmd.models.family import random_family

    teacher = random_family("sd3-medium", 12, 512, device=torch.device("meta")).teacher
    return "sd3-medium depth 12", [tuple(p.shape) for p in teacher.parameters()]


def make_state(shapes, device):
    masters = [torch.randn(s, device=device) * 0.02 for s in shapes]
    return dict(masters=masters, grads=[(torch.randn(s, device=device) * 1e-3).to(torch.bfloat16) for s in shapes],
                exp_avgs=[torch.zeros_like(m) for m in masters], exp_avg_sqs=[torch.rand_like(m) * 1e-6 for m in masters],
                copies=[m.to(torch.bfloat16) for m in masters], emas=[m.clone() for m in masters])


def torch_separate(s, steps):
    grads = [g.float() for g in s["grads"]]
    torch._fused_adamw_(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], [], steps, amsgrad=False,
                        maximize=False, **adamw_args())
    torch._foreach_copy_(s["copies"], s["masters"])
    torch._foreach_lerp_(s["emas"], s["masters"], EMA_WEIGHT)


def torch_fused_adamw(s, steps, grads32):
    torch._fused_adamw_(s["masters"], grads32, s["exp_avgs"], s["exp_avg_sqs"], [], steps, amsgrad=False,
                        maximize=False, **adamw_args())


def adamw_args():
    return dict(lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"], weight_decay=HYPER["weight_decay"],
                eps=HYPER["eps"])


def fused(impl, s):
    impl(s["masters"], s["grads"], None, s["exp_avg_sqs"], s["copies"], step=STEP, emas=s["emas"],
         ema_weight=EMA_WEIGHT, **HYPER)


def main():
    args = parse_args(__doc__)
    device = args.device
    name, shapes = parameter_shapes(args.small)
    params = sum(torch.Size(s).numel() for s in shapes)
    nbytes = BYTES_PER_PARAM * params
    copy_gbs = copy_bandwidth(device, (128 if args.small else 1024) * 2**20)
    env = environment(device, copy_gbs)
    notes = [f"bytes = {BYTES_PER_PARAM} B/param (beta1 = 0: fp32 master, exp_avg_sq and EMA read and written, "
             "no exp_avg, bf16 gradient read, bf16 copy written), for every row",
             "torch_separate: bf16 gradients cast to fp32 + torch._fused_adamw_ + _foreach_copy_ + _foreach_lerp_ "
             "(52 B/param); torch_fused_adamw: torch._fused_adamw_ on fp32 gradients only (28 B/param, no copy, no EMA); "
             "triton_exp_avg: triton writing exp_avg too (32 B/param)"]
    s = make_state(shapes, device)
    steps = [torch.tensor(float(STEP), device=device) for _ in shapes]
    grads32 = [g.float() for g in s["grads"]]
    impls = {"reference_eager": lambda: fused(reference.master_adamw_, s),
             "torch_separate": lambda: torch_separate(s, steps),
             "torch_fused_adamw": lambda: torch_fused_adamw(s, steps, grads32)}
    if device.type == "cuda":
        from fastdmd.ops.master_adamw_triton import master_adamw_update_

        # as MasterAdamW steps: the fixed tensors checked and their addresses sent once, the gradients each call
        plan = reference.MasterAdamWPlan(s["masters"], None, s["exp_avg_sqs"], s["copies"], s["emas"])
        impls["triton"] = lambda: master_adamw_update_(plan, s["grads"], step=STEP, ema_weight=EMA_WEIGHT, **HYPER)
        kept = reference.MasterAdamWPlan(s["masters"], s["exp_avgs"], s["exp_avg_sqs"], s["copies"], s["emas"])
        impls["triton_exp_avg"] = lambda: master_adamw_update_(kept, s["grads"], step=STEP, ema_weight=EMA_WEIGHT,
                                                               **HYPER)
    else:
        notes.append(TRITON_ON_CPU_NOTE)
    rows = []
    for impl_name, fn in impls.items():
        row = dict(parameters=name, numel=params, tensors=len(shapes), impl=impl_name, bytes=nbytes)
        rows.append(row | measure(lambda fn=fn: fn, device, args.repeats, nbytes, copy_gbs))
        write_results("master_adamw", device, env, rows, args.out, notes)
    report("master_adamw", device, env, rows, args.out, notes)


if __name__ == "__main__":
    main()
