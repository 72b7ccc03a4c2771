"""Export a run's generator as a diffusers directory: `python -m fastdmd.export RUN_DIR OUT_DIR`.

OUT_DIR/unet        UNet2DModel.save_pretrained (safetensors): `UNet2DModel.from_pretrained(OUT_DIR/"unet")`
OUT_DIR/scheduler   the student's few-step sampler as a FlowMatchEulerDiscreteScheduler config (below)
SD3 / FLUX runs: a full pipeline directory, the teacher's pipeline components (the folders its
model_index.json lists, or without one those of the family's diffusers pipeline: text encoders, tokenizers,
vae/; no stray files such as a single-file checkpoint beside them) and model_index.json, with the trained
transformer in transformer/, in the run's model.dtype (the fp32 master weights cast, as one ships them), and
the few-step scheduler in scheduler/:
`SD3Transformer2DModel.from_pretrained(OUT_DIR, subfolder="transformer")`, or the whole
`StableDiffusion3Pipeline.from_pretrained(OUT_DIR)(prompt, sigmas=<fastdmd.json's generator_sigmas>,
guidance_scale=1.0)` when the teacher directory had every component (guidance_scale 1: the student needs
no CFG; `num_inference_steps=4` gives the trained sigmas only when they are evenly spaced from 1, below).
OUT_DIR/fastdmd.json  what the weights alone do not say: the few-step sigmas, the guidance scale the
                    teacher used during distillation, the null label (digits), where the weights came from

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
import torch.nn as nn

from fastdmd.config import ModelConfig
from fastdmd.data.digits import NUM_CLASSES
from fastdmd.models.digits import NULL_LABEL, DigitsFlowAdapter
from fastdmd.models.family import DTYPES
from fastdmd.runs import TrainedGenerator, UsageError, cli_errors, load_run_generator, read_run_config

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


PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def pipeline_components(teacher_dir: str, family: str) -> list[str]:
    """The teacher's pipeline component folders that the export copies: those its model_index.json lists
    (a [null, null] entry is a component it lacks), or without one those the family's diffusers pipeline
    takes; only folders that exist, and not transformer/ and scheduler/, which the export writes."""
    index = os.path.join(teacher_dir, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = [k for k, v in json.load(f).items() if not k.startswith("_") and isinstance(v, list) and any(v)]
        except (ValueError, AttributeError) as e:
            raise UsageError(f"the run's teacher directory has an unreadable {index} ({type(e).__name__}: {e}); "
                             f"expected the JSON that {PIPELINES[family]}.save_pretrained writes") from None
    else:
        import inspect

        import diffusers

        names = list(inspect.signature(getattr(diffusers, PIPELINES[family]).__init__).parameters)[1:]
    return [n for n in names if n not in ("transformer", "scheduler") and os.path.isdir(os.path.join(teacher_dir, n))]


def _refuse_unsafe_output(out_dir: str, run_dir: str, teacher_dir: str | None) -> None:
    """The run directory (an export there would make it read as an export) and the teacher directory or a
    folder inside it (whose pipeline the export copies, and whose transformer/ it would overwrite)."""
    out = os.path.realpath(out_dir)
    if out == os.path.realpath(run_dir):
        raise UsageError(f"output {out_dir} is the run directory; give another folder, e.g. "
                         f"{os.path.join(run_dir, 'export')}")
    if teacher_dir and os.path.commonpath([out, os.path.realpath(teacher_dir)]) == os.path.realpath(teacher_dir):
        where = "is" if out == os.path.realpath(teacher_dir) else "is inside"
        raise UsageError(f"output {out_dir} {where} the run's teacher directory {teacher_dir}, whose pipeline the "
                         f"export copies; give a folder outside it")


def export_run(run_dir: str, out_dir: str) -> TrainedGenerator:
    """Write the run's generator (EMA weights when present) to out_dir; returns what was exported."""
    cfg = read_run_config(run_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"output {out_dir} is a file; expected a directory (new or existing) to write unet/, "
                         f"scheduler/ and {META_FILE} into")
    _refuse_unsafe_output(out_dir, run_dir, cfg.model.path if cfg.model.family != "digits" else None)
    gen = load_run_generator(run_dir)
    if gen.family == "digits":
        gen.net.save_pretrained(os.path.join(out_dir, "unet"), safe_serialization=True)
        scheduler = few_step_scheduler(gen.sigmas)
    else:
        # A full pipeline directory: the teacher's components (text encoders, tokenizers, VAE,
        # model_index.json) with the trained transformer and the few-step scheduler in place of the teacher's;
        # the pipeline's folders only: a single-file checkpoint beside them (flux1-dev.safetensors, 24 GB) stays.
        for name in pipeline_components(gen.model.path, gen.family):
            shutil.copytree(os.path.join(gen.model.path, name), os.path.join(out_dir, name), dirs_exist_ok=True)
        if os.path.isfile(os.path.join(gen.model.path, "model_index.json")):
            shutil.copyfile(os.path.join(gen.model.path, "model_index.json"), os.path.join(out_dir, "model_index.json"))
        # In the run's model.dtype, as the teacher came (nn.Module.to: diffusers' own warns against casting a
        # built model, for _keep_in_fp32_modules, which SD3 and FLUX have none of).
        net = nn.Module.to(gen.net, DTYPES[gen.model.dtype])
        net.save_pretrained(os.path.join(out_dir, "transformer"), safe_serialization=True)
        teacher = FlowMatchEulerDiscreteScheduler.load_config(os.path.join(gen.model.path, "scheduler"))
        scheduler = few_step_scheduler(gen.sigmas, {k: v for k, v in teacher.items() if not k.startswith("_")})
    scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
    meta = {
        "family": gen.family,
        "generator_sigmas": list(gen.sigmas),
        "guidance_scale": gen.guidance_scale,
        **({"null_label": NULL_LABEL, "num_classes": NUM_CLASSES} if gen.family == "digits" else {}),
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
        cast = "" if gen.model.dtype == "float32" else ", the trained fp32 weights cast to the run's model.dtype"
        print(f"  {args.out_dir}  {gen.family} pipeline directory, trained transformer in transformer/ "
              f"({gen.model.dtype}{cast}), few-step scheduler in scheduler/; sigmas {list(gen.sigmas)} in {META_FILE}")
        return
    print(f"  {os.path.join(args.out_dir, 'unet')}        UNet2DModel (safetensors)")
    print(f"  {os.path.join(args.out_dir, 'scheduler')}   FlowMatchEulerDiscreteScheduler (few-step, stochastic)")
    print(f"  {os.path.join(args.out_dir, META_FILE)}  sigmas {list(gen.sigmas)}, guidance_scale {gen.guidance_scale}, "
          f"null_label {NULL_LABEL}")


if __name__ == "__main__":
    main()
