"""Train the digits assets: the class-conditional flow-matching teacher and the digits classifier.

    python -m fastdmd.teacher                # writes fastdmd/assets/*.safetensors + manifest

The teacher is a diffusers UNet2DModel with class embeddings (label 10 = unconditional, dropped in
with probability `--cfg-dropout` so CFG works), trained on the 4,000-image train split with the
rectified-flow loss ||v_pred - (eps - x0)||^2 at sigma ~ U(0, 1); its EMA weights are shipped. The
classifier is a small CNN trained with random 2-pixel shifts. The manifest records the command,
seed, step counts, wall time and the classifier's held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from fastdmd.data import load_digits
from fastdmd.models.digits import (
    ASSETS_DIR, CLASSIFIER_FILE, MANIFEST_FILE, NULL_LABEL, TEACHER_FILE, DigitsClassifier, DigitsFlowAdapter,
    build_digits_unet,
)


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_classifier(steps: int, batch_size: int, seed: int) -> tuple[DigitsClassifier, float]:
    train, test = load_digits("train"), load_digits("test")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="classifier", dynamic_ncols=True):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        x = random_shift(train.images[idx], 2, gen)
        loss = F.cross_entropy(model(x), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
    return model, accuracy


def train_teacher(steps: int, batch_size: int, lr: float, cfg_dropout: float, ema_decay: float, seed: int):
    train = load_digits("train")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    adapter = DigitsFlowAdapter()
    model = build_digits_unet()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    bar = tqdm(range(steps), desc="teacher", dynamic_ncols=True)
    loss_avg = None
    for step in bar:
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        x0, labels = train.images[idx], train.labels[idx].clone()
        labels[torch.rand(batch_size, generator=gen) < cfg_dropout] = NULL_LABEL
        sigma = torch.rand(batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        pred = adapter.predict(model, adapter.add_noise(x0, sigma, eps), sigma, labels)
        loss = F.mse_loss(pred, adapter.target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        loss_avg = loss.item() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
    return ema.module.eval(), loss_avg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastdmd.teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000, help="teacher optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of the unconditional label")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=ASSETS_DIR, help="output folder (default: the package's assets)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "classifier_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("cfg_dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder")
    os.makedirs(args.out, exist_ok=True)

    t0 = time.perf_counter()
    classifier, accuracy = train_classifier(args.classifier_steps, args.batch_size, args.seed)
    print(f"classifier held-out accuracy: {accuracy:.4f}")
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, os.path.join(args.out, CLASSIFIER_FILE))
    teacher, final_loss = train_teacher(args.steps, args.batch_size, args.lr, args.cfg_dropout, args.ema_decay, args.seed)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, os.path.join(args.out, TEACHER_FILE))

    manifest = {
        "command": "python -m fastdmd.teacher " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "args": vars(args) | {"out": None},
        "classifier_test_accuracy": accuracy,
        "teacher_final_loss_ema": final_loss,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.out, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
