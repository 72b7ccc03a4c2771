"""Sample from a trained generator (digits classes, or SD3 / FLUX prompts):
`python -m fastdmd.generate RUN_OR_EXPORT --label 3 [--label 7 ...] [--num 8] [--steps 4] [--seed 0] --out DIR`.

RUN_OR_EXPORT is a run directory (the latest checkpoint's generator, EMA weights when present) or a
directory written by `python -m fastdmd.export`; the same seed gives the same images from either.
Sampling is the few-step sampler the generator was trained for, at the run's dmd.generator_sigmas.
--steps other than the trained number uses noise levels spaced linearly from 1 (1, 1 - 1/n, ...,
1/n), which the generator never saw in training: expect lower quality the further n is from the
trained number. Writes DIR/grid.png (rows labelled by class) and DIR/label<c>_<i>.png per sample.

SD3 / FLUX runs and their exports: `python -m fastdmd.generate RUN_OR_EXPORT --prompt "a red square"
[--prompt ...]`. A prompt the run trained on uses its embedding in the run's prompt cache (the cache's own
prompt list: the run's prompt file may have been edited since); any other prompt, or every prompt once
the cache is gone, is encoded with the pipeline's text encoders (of the run's model directory, or of the
export). Samples are decoded by its VAE (RGB PNGs, prompt<k>_<i>.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch
import torch.nn as nn

from fastdmd.config import ModelConfig
from fastdmd.data.digits import NUM_CLASSES
from fastdmd.export import is_export_dir, load_export
from fastdmd.models.family import DTYPES
from fastdmd.models.prompts import (
    MissingTextEncoders, cache_contents, default_cache_path, encode_all, read_prompts, save_prompt_cache,
)
from fastdmd.plot import save_grids, save_images
from fastdmd.rollout import few_step_sample, linear_sigmas
from fastdmd.runs import TrainedGenerator, UsageError, cli_errors, load_run_generator


def load_generator(path: str) -> TrainedGenerator:
    """A run directory or an export directory, told apart by what each holds."""
    if is_export_dir(path):
        return load_export(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        gen = load_run_generator(path)
        if gen.family != "digits":
            # In the run's model.dtype, as its export samples: a FLUX transformer's fp32 master weights would
            # take twice the memory of the bf16 ones it trained with (nn.Module.to, as in export.py).
            nn.Module.to(gen.net, DTYPES[gen.model.dtype])
        return gen
    what = "does not exist" if not os.path.exists(path) else "is neither a run nor an export directory"
    raise UsageError(f"{path} {what}; expected a run directory (config.json and checkpoints/, written by "
                     f"`python -m fastdmd.train`) or an export directory (fastdmd.json and unet/, written by "
                     f"`python -m fastdmd.export`)")


def sampling_sigmas(trained: tuple[float, ...], steps: int | None) -> list[float]:
    """The trained noise levels, or for another step count, levels spaced linearly from 1."""
    if steps is None or steps == len(trained):
        return list(trained)
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps} (the generator was trained for {len(trained)})")
    return linear_sigmas(steps)


def sample(gen: TrainedGenerator, labels: list[int], num: int, sigmas: list[float], seed: int,
           device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` samples of each label, in [-1, 1], on the CPU; noise and re-noising draw from one CPU stream
    seeded by `seed`, so a seed gives the same samples on any device up to its arithmetic."""
    bad = [c for c in labels if not 0 <= c < NUM_CLASSES]
    if bad:
        raise UsageError(f"label {bad[0]} is not a digit class; valid labels are 0..{NUM_CLASSES - 1}")
    if num < 1:
        raise UsageError(f"--num must be >= 1, got {num}")
    y = torch.tensor(labels).repeat_interleave(num)
    rng = torch.Generator().manual_seed(seed)
    c, size = gen.net.config.in_channels, gen.net.config.sample_size
    noise = torch.randn((len(y), c, size, size), generator=rng)
    gen.net.to(device)
    return few_step_sample(gen.x0_fn(), noise.to(device), y.to(device), sigmas, rng).cpu(), y


def sampling_device(name: str | None) -> torch.device:
    """--device, checked: a CUDA device needs CUDA here and an index below the device count."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: fastdmd.generate samples on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _run_prompt_cache(model: ModelConfig) -> str | None:
    """The run's prompt cache file while it is there: model.prompt_cache, or the default one, which is named
    after the prompt file's prompts (found only while that file is as the run read it)."""
    cache = model.prompt_cache
    if not cache and os.path.isfile(model.prompts):
        cache = default_cache_path(model.path, read_prompts(model.prompts), model.max_sequence_length)
    return cache if cache and os.path.isfile(cache) else None


def _cached_prompts(cache: str) -> list[str]:
    """The prompts a cache holds embeddings of (its safetensors metadata): the prompts the run trained on."""
    try:
        names = json.loads(cache_contents(cache)[0].get("prompts", "null"))
    except ValueError as e:
        raise UsageError(f"prompt cache {cache} has unreadable 'prompts' metadata ({e})") from None
    if not names:
        raise UsageError(f"prompt cache {cache} does not list its prompts (no 'prompts' metadata, which fastdmd "
                         f"writes); without it the cached embeddings cannot be matched to prompts")
    return names


def _text_encoder(model: ModelConfig, prompt: str, why: str):
    """The pipeline's text encoders (of the run's model directory, or of the export), on the CPU."""
    from fastdmd.models import flux, sd3

    load_encoder = {"sd3": sd3.text_encoder, "flux": flux.text_encoder}[model.family]
    try:
        return load_encoder(model.path, torch.device("cpu"))
    except MissingTextEncoders as e:
        raise UsageError(f"--prompt {prompt!r} {why}, and encoding a new one needs the pipeline's text encoders and "
                         f"tokenizers, which {e.model_path} lacks: {e.missing}") from None


def _with_prompt_table(model: ModelConfig, prompts: list[str], tmp: str) -> ModelConfig:
    """The model section pointed at a prompt file and a cache that agree: the run's cache with the prompts it
    was made for, the ones the run trained on (the run's prompt file may have been edited or removed since),
    or, where that cache is gone, a cache of the asked prompts encoded now, in `tmp`."""
    cache = _run_prompt_cache(model)
    if cache:
        names = _cached_prompts(cache)
    else:
        names, cache = prompts, os.path.join(tmp, "prompts.safetensors")
        encoder = _text_encoder(model, prompts[0], "has no cached embedding (the run's prompt cache is gone)")
        embeds, pooled = encode_all(encoder, prompts + [""], model.max_sequence_length)
        save_prompt_cache(cache, prompts, embeds, pooled, model.family, model.max_sequence_length)
    prompt_file = os.path.join(tmp, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(names) + "\n")
    return dataclasses.replace(model, prompts=prompt_file, prompt_cache=cache)


def sample_prompts(gen: TrainedGenerator, prompts: list[str], num: int, sigmas: list[float], seed: int,
                   device: torch.device = torch.device("cpu")):
    """SD3 / FLUX: `num` decoded samples per prompt, in [-1, 1] on the CPU, with their prompt indices, drawn
    and decoded on `device`. A run samples its checkpoint's transformer (the teacher's weights are not read);
    an export its transformer/ (loaded as the family's network). A prompt the
    run trained on takes its embedding from the run's prompt cache; any other prompt, or every prompt once
    that cache is gone, is encoded with the text encoders."""
    import tempfile

    from fastdmd.models.family import load_family
    from fastdmd.roles import Generator

    if num < 1:
        raise UsageError(f"--num must be >= 1, got {num}")
    with tempfile.TemporaryDirectory() as tmp:
        model = _with_prompt_table(gen.model, prompts, tmp)
        family = load_family(model, device, weights=gen.net is None)
    adapter = family.adapter
    known = {p: i for i, p in enumerate(family.condition_names)}
    new = [p for p in prompts if p not in known]
    if new:  # encode the prompts the run did not train on (needs the text encoders)
        encoder = _text_encoder(model, new[0], f"is not one of the run's prompts {family.condition_names}")
        embeds, pooled = encode_all(encoder, new, model.max_sequence_length)
        adapter.prompt_embeds = torch.cat([adapter.prompt_embeds, embeds.to(adapter.prompt_embeds)])
        adapter.pooled = torch.cat([adapter.pooled, pooled.to(adapter.pooled)])
        known |= {p: adapter.prompt_embeds.shape[0] - len(new) + i for i, p in enumerate(new)}
    y = torch.tensor([known[p] for p in prompts]).repeat_interleave(num)
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(y), *family.sample_shape), generator=rng)
    net = (gen.net if gen.net is not None else family.teacher).to(device)
    latents = few_step_sample(Generator(net, adapter), noise.to(device), y.to(device), sigmas, rng)
    return family.decode(latents).cpu(), torch.arange(len(prompts)).repeat_interleave(num)


def main(argv: list[str] | None = None) -> list[str]:
    """The CLI; returns the paths it wrote (the grid first)."""
    parser = argparse.ArgumentParser(prog="python -m fastdmd.generate", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="RUN_OR_EXPORT", help="a run directory or an export directory")
    parser.add_argument("--label", type=int, action="append", default=[],
                        help=f"digit class 0..{NUM_CLASSES - 1} to draw; repeat for several (digits runs)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="SD3 / FLUX runs: a prompt to draw; repeat for several")
    parser.add_argument("--num", type=int, default=8, help="samples per label (default 8)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps (default: the trained number; others use linearly spaced sigmas)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--out", required=True, help="folder for the PNGs (created if missing)")
    parser.add_argument("--device", default=None,
                        help="where to sample: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    labels = list(dict.fromkeys(args.label))  # each class once, in the order given
    prompts = list(dict.fromkeys(p.strip() for p in args.prompt))  # as the prompt file's lines are read
    with cli_errors("fastdmd.generate"):
        if "" in prompts:
            raise UsageError("--prompt is empty; give the text of a prompt (the empty prompt is the run's "
                             "unconditional input)")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a file; give a folder for the PNGs (created if missing)")
        device = sampling_device(args.device)
        gen = load_generator(args.source)
        sigmas = sampling_sigmas(gen.sigmas, args.steps)
        if gen.family == "digits":
            if not labels or prompts:
                raise UsageError("a digits run draws classes: give --label (a digit 0..9), repeated for several"
                                 + (", and no --prompt" if prompts else ""))
            images, y = sample(gen, labels, args.num, sigmas, args.seed, device)
        else:
            if not prompts or labels:
                raise UsageError(f"a {gen.family} run draws prompts: give --prompt, repeated for several"
                                 + (", and no --label" if labels else ""))
            images, y = sample_prompts(gen, prompts, args.num, sigmas, args.seed, device)
            labels = list(range(len(prompts)))
    print(f"generator: {gen.describe()}, sampling on {device}")
    if sigmas != list(gen.sigmas):
        print(f"note: trained for {len(gen.sigmas)} steps at sigmas {list(gen.sigmas)}; sampling {len(sigmas)} steps "
              f"at linearly spaced sigmas {sigmas}, which it never saw in training")
    else:
        print(f"sampling {len(sigmas)} steps at the trained sigmas {sigmas}, seed {args.seed}")
    os.makedirs(args.out, exist_ok=True)
    grid = os.path.join(args.out, "grid.png")
    save_grids({f"{len(sigmas)}-step, step {gen.step} ({gen.weights}), seed {args.seed}": (images, y)}, grid,
               per_class=args.num)
    kind = "label" if gen.family == "digits" else "prompt"
    names = [f"{kind}{c}_{i:03d}.png" for c in labels for i in range(args.num)]
    paths = save_images(images, names, args.out)
    rows = ", ".join(map(str, sorted(labels))) if gen.family == "digits" else \
        ", ".join(f"{k} = {p!r}" for k, p in enumerate(prompts))
    print(f"wrote {grid} (one row per {kind}: {rows})")
    print(f"wrote {len(paths)} images {os.path.join(args.out, kind + '<k>_<i>.png')} ({args.num} per {kind})")
    return [grid, *paths]


if __name__ == "__main__":
    main()
