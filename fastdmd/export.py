"""Export a run's generator as a diffusers directory: `python -m fastdmd.export RUN_DIR OUT_DIR`.

OUT_DIR/unet        UNet2DModel.save_pretrained (safetensors): `UNet2DModel.from_pretrained(OUT_DIR/"unet")`
OUT_DIR/scheduler   the FlowMatchEulerDiscreteScheduler config of the digits family
SD3 / FLUX runs: a full pipeline directory, the teacher's (model_index.json, text encoders, tokenizers,
vae/, scheduler/) with the trained transformer in transformer/: `SD3Transformer2DModel.from_pretrained(
OUT_DIR, subfolder="transformer")`, or the whole `StableDiffusion3Pipeline.from_pretrained(OUT_DIR)`
when the teacher directory had every component.
OUT_DIR/fastdmd.json  what the weights alone do not say: the few-step sigmas, the guidance scale the
                    teacher used during distillation, the null label, where the weights came from

The UNet predicts the flow velocity v at timestep 1000 * sigma; x0 = x_t - sigma * v. The student
samples with fastdmd.rollout.few_step_sample at the sigmas in fastdmd.json, without CFG.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from fastdmd.data.digits import NUM_CLASSES
from fastdmd.models.digits import NULL_LABEL, DigitsFlowAdapter
from fastdmd.runs import TrainedGenerator, UsageError, cli_errors, load_run_generator

META_FILE = "fastdmd.json"


def export_run(run_dir: str, out_dir: str) -> TrainedGenerator:
    """Write the run's generator (EMA weights when present) to out_dir; returns what was exported."""
    gen = load_run_generator(run_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"output {out_dir} is a file; expected a directory (new or existing) to write unet/, "
                         f"scheduler/ and {META_FILE} into")
    if gen.family == "digits":
        gen.net.save_pretrained(os.path.join(out_dir, "unet"), safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=DigitsFlowAdapter.num_train_timesteps, shift=1.0) \
            .save_pretrained(os.path.join(out_dir, "scheduler"))
    else:
        # A full pipeline directory: the teacher's components (text encoders, tokenizers, VAE,
        # scheduler, model_index.json) with the trained transformer in place of the teacher's.
        shutil.copytree(gen.model_path, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer"))
        gen.net.save_pretrained(os.path.join(out_dir, "transformer"), safe_serialization=True)
    meta = {
        "family": gen.family,
        "generator_sigmas": list(gen.sigmas),
        "guidance_scale": gen.guidance_scale,
        "null_label": NULL_LABEL,
        "num_classes": NUM_CLASSES,
        "prediction": "velocity v at timestep 1000 * sigma; x0 = x_t - sigma * v",
        "weights": gen.weights,
        "step": gen.step,
        "run_dir": gen.run_dir,
        "checkpoint": gen.checkpoint,
    }
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return gen


def is_export_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def load_export(out_dir: str) -> TrainedGenerator:
    """Read back what export_run wrote (the inverse of export_run)."""
    meta_path, unet_dir = os.path.join(out_dir, META_FILE), os.path.join(out_dir, "unet")
    if not is_export_dir(out_dir) or not os.path.isdir(unet_dir):
        raise UsageError(f"{out_dir} is not a fastdmd export: expected {META_FILE} and unet/ "
                         f"(written by `python -m fastdmd.export RUN_DIR {out_dir}`)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("family", "digits") != "digits":
            raise UsageError(f"{out_dir} is a {meta['family']} pipeline export: load it with diffusers "
                             f"(e.g. StableDiffusion3Pipeline.from_pretrained), or generate from the run directory "
                             f"{meta.get('run_dir')}")
        net = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False)  # no accelerate needed
        return TrainedGenerator(net=net.eval().requires_grad_(False), sigmas=tuple(meta["generator_sigmas"]),
                                guidance_scale=meta["guidance_scale"], weights=meta["weights"], step=meta["step"],
                                run_dir=meta["run_dir"], checkpoint=meta["checkpoint"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"export {out_dir} is incomplete or corrupted ({type(e).__name__}: {e}); "
                         f"export it again") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdmd.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory written by `python -m fastdmd.train`")
    parser.add_argument("out_dir", help="where to write the diffusers directory (created if missing)")
    args = parser.parse_args(argv)
    with cli_errors("fastdmd.export"):
        gen = export_run(args.run_dir, args.out_dir)
    print(f"exported {gen.describe()}")
    if gen.family != "digits":
        print(f"  {args.out_dir}  {gen.family} pipeline directory, trained transformer in transformer/; "
              f"sigmas {list(gen.sigmas)} in {META_FILE}")
        return
    print(f"  {os.path.join(args.out_dir, 'unet')}        UNet2DModel (safetensors)")
    print(f"  {os.path.join(args.out_dir, 'scheduler')}   FlowMatchEulerDiscreteScheduler")
    print(f"  {os.path.join(args.out_dir, META_FILE)}  sigmas {list(gen.sigmas)}, guidance_scale {gen.guidance_scale}, "
          f"null_label {NULL_LABEL}")


if __name__ == "__main__":
    main()
