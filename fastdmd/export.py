"""Export a run's generator as a diffusers directory: `python -m fastdmd.export RUN_DIR OUT_DIR`.

OUT_DIR/unet        UNet2DModel.save_pretrained (safetensors): `UNet2DModel.from_pretrained(OUT_DIR/"unet")`
OUT_DIR/scheduler   the student's few-step sampler as a FlowMatchEulerDiscreteScheduler config (below)
SD3 / FLUX runs: a full pipeline directory, the teacher's (model_index.json, text encoders, tokenizers,
vae/) with the trained transformer in transformer/ and the few-step scheduler in scheduler/:
`SD3Transformer2DModel.from_pretrained(OUT_DIR, subfolder="transformer")`, or the whole
`StableDiffusion3Pipeline.from_pretrained(OUT_DIR)(prompt, num_inference_steps=4, guidance_scale=1.0)`
when the teacher directory had every component (guidance_scale 1: the student needs no CFG).
OUT_DIR/fastdmd.json  what the weights alone do not say: the few-step sigmas, the guidance scale the
                    teacher used during distillation, the null label, where the weights came from

The UNet predicts the flow velocity v at timestep 1000 * sigma; x0 = x_t - sigma * v. The student
samples with fastdmd.rollout.few_step_sample at the sigmas in fastdmd.json, without CFG: predict x0,
re-noise it with fresh noise to the next sigma. That is FlowMatchEulerDiscreteScheduler with
stochastic_sampling=True, shift 1 and no dynamic shifting; when the sigmas are evenly spaced from 1
(the default 1, 0.75, 0.5, 0.25), shift_terminal = the last sigma makes `set_timesteps(4)` give exactly
them, so a plain diffusers loop (`scheduler.set_timesteps(4)`, then `scheduler.step(v, t, x,
generator=g)` per timestep) reproduces fastdmd.generate for the same seed; diffusers pipelines call
scheduler.step without their generator, so seed torch's global stream instead (`torch.manual_seed(seed)`,
no generator=). Other sigmas (the sd3 recipe's 0.999, ...): pass `sigmas=` from fastdmd.json, which says which.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

import numpy as np

from fastdmd.config import ModelConfig
from fastdmd.data.digits import NUM_CLASSES
from fastdmd.models.digits import NULL_LABEL, DigitsFlowAdapter
from fastdmd.runs import TrainedGenerator, UsageError, cli_errors, load_run_generator

META_FILE = "fastdmd.json"


def few_step_scheduler(sigmas: tuple[float, ...], base_config: dict | None = None) -> FlowMatchEulerDiscreteScheduler:
    """The student's sampler as a diffusers scheduler (see the module docstring); `base_config` is the
    teacher's scheduler config (SD3 / FLUX), whose training timesteps it keeps."""
    config = dict(base_config or {"num_train_timesteps": DigitsFlowAdapter.num_train_timesteps})
    config.update(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True, shift_terminal=None,
                  use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False)
    n = len(sigmas)
    if n > 1 and sigmas[0] == 1.0 and np.allclose(sigmas, np.linspace(1.0, sigmas[-1], n), atol=1e-6):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config({**config, "shift_terminal": sigmas[-1]})
        scheduler.set_timesteps(n)
        if np.allclose(scheduler.sigmas[:-1].numpy(), sigmas, atol=1e-6):
            return scheduler
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def scheduler_usage(scheduler: FlowMatchEulerDiscreteScheduler, sigmas: tuple[float, ...]) -> str:
    if scheduler.config.shift_terminal is not None:
        return f"num_inference_steps={len(sigmas)} gives the trained sigmas"
    return f"pass sigmas={list(sigmas)} (set_timesteps or the pipeline's sigmas argument)"


def export_run(run_dir: str, out_dir: str) -> TrainedGenerator:
    """Write the run's generator (EMA weights when present) to out_dir; returns what was exported."""
    gen = load_run_generator(run_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"output {out_dir} is a file; expected a directory (new or existing) to write unet/, "
                         f"scheduler/ and {META_FILE} into")
    if gen.family == "digits":
        gen.net.save_pretrained(os.path.join(out_dir, "unet"), safe_serialization=True)
        scheduler = few_step_scheduler(gen.sigmas)
    else:
        # A full pipeline directory: the teacher's components (text encoders, tokenizers, VAE,
        # scheduler, model_index.json) with the trained transformer in place of the teacher's.
        shutil.copytree(gen.model.path, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer", "scheduler"))
        gen.net.save_pretrained(os.path.join(out_dir, "transformer"), safe_serialization=True)
        teacher = FlowMatchEulerDiscreteScheduler.load_config(os.path.join(gen.model.path, "scheduler"))
        scheduler = few_step_scheduler(gen.sigmas, {k: v for k, v in teacher.items() if not k.startswith("_")})
    scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
    meta = {
        "family": gen.family,
        "generator_sigmas": list(gen.sigmas),
        "guidance_scale": gen.guidance_scale,
        "null_label": NULL_LABEL,
        "num_classes": NUM_CLASSES,
        "prediction": "velocity v at timestep 1000 * sigma; x0 = x_t - sigma * v",
        "scheduler": "scheduler/ (FlowMatchEulerDiscreteScheduler, stochastic_sampling: predict x0, re-noise with "
                     f"fresh noise): {scheduler_usage(scheduler, gen.sigmas)}",
        "weights": gen.weights,
        "step": gen.step,
        "run_dir": gen.run_dir,
        "checkpoint": gen.checkpoint,
    }
    if gen.family != "digits":  # what `fastdmd.generate OUT_DIR --prompt` needs besides the pipeline
        model = dataclasses.asdict(gen.model)
        model |= {key: os.path.abspath(model[key]) if model[key] else "" for key in ("prompts", "prompt_cache")}
        meta["model"] = {key: value for key, value in model.items() if key not in ("path", "init_generator")}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return gen


def is_export_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def load_export(out_dir: str) -> TrainedGenerator:
    """Read back what export_run wrote (the inverse of export_run). SD3 / FLUX: the network is left to
    the family loader (net None; its transformer/ is the trained one), with the run's model section."""
    meta_path = os.path.join(out_dir, META_FILE)
    if not is_export_dir(out_dir):
        raise UsageError(f"{out_dir} is not a fastdmd export: expected {META_FILE} (written by "
                         f"`python -m fastdmd.export RUN_DIR {out_dir}`)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        family = meta.get("family", "digits")
        weights_dir = os.path.join(out_dir, "unet" if family == "digits" else "transformer")
        if not os.path.isdir(weights_dir):
            raise UsageError(f"{out_dir} is not a complete fastdmd export: {weights_dir} is missing; export it again")
        common = dict(sigmas=tuple(meta["generator_sigmas"]), guidance_scale=meta["guidance_scale"],
                      weights=meta["weights"], step=meta["step"], run_dir=meta["run_dir"], checkpoint=meta["checkpoint"])
        if family != "digits":
            model = ModelConfig(**(meta["model"] | {"family": family, "path": os.path.abspath(out_dir)}))
            return TrainedGenerator(net=None, family=family, model=model, **common)
        net = UNet2DModel.from_pretrained(weights_dir, low_cpu_mem_usage=False)  # no accelerate needed
        return TrainedGenerator(net=net.eval().requires_grad_(False), **common)
    except (OSError, ValueError, KeyError, TypeError) as e:
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
        print(f"  {args.out_dir}  {gen.family} pipeline directory, trained transformer in transformer/, "
              f"few-step scheduler in scheduler/; sigmas {list(gen.sigmas)} in {META_FILE}")
        return
    print(f"  {os.path.join(args.out_dir, 'unet')}        UNet2DModel (safetensors)")
    print(f"  {os.path.join(args.out_dir, 'scheduler')}   FlowMatchEulerDiscreteScheduler (few-step, stochastic)")
    print(f"  {os.path.join(args.out_dir, META_FILE)}  sigmas {list(gen.sigmas)}, guidance_scale {gen.guidance_scale}, "
          f"null_label {NULL_LABEL}")


if __name__ == "__main__":
    main()
