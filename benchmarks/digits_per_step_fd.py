"""Diagnostic: FD and class accuracy of the x0 a run's generator predicts at each step of its few-step
sampler (1,000 samples, balanced labels, the evaluation's noise seed 1234), on the run's final (EMA)
weights; `teacher` scores the shipped teacher used as the same x0 sampler (the generator at step 0).

    python benchmarks/digits_per_step_fd.py teacher runs/digits-bar/seed0 [RUN ...]

Step k's x0 is what the k+1-step truncation of the sampler returns; the last one is the student's
sample. Used to find that the default's last step made samples worse (digits_dmd2_tuning.md).
"""

from __future__ import annotations

import argparse
import copy

import torch

from fastdmd.data import load_digits
from fastdmd.generate import load_generator
from fastdmd.metrics import score_sampler
from fastdmd.models.digits import DigitsFlowAdapter, load_digits_assets
from fastdmd.roles import Generator

SIGMAS = (1.0, 0.75, 0.5, 0.25)


def truncated(x0_fn, sigmas, stop: int):
    def sample(noise, labels):
        rng, x = torch.Generator().manual_seed(1234), noise
        with torch.no_grad():
            for i, s in enumerate(sigmas):
                x0 = x0_fn(x, torch.full((x.shape[0],), s), labels)
                if i == stop:
                    return x0
                eps = torch.randn(x0.shape, generator=rng)
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
    return sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="`teacher`, or a run directory of the digits family")
    args = p.parse_args()
    teacher, classifier, _ = load_digits_assets()
    test = load_digits("test")
    for path in args.runs:
        if path == "teacher":
            x0_fn, sigmas = Generator(copy.deepcopy(teacher), DigitsFlowAdapter()), SIGMAS
        else:
            gen = load_generator(path)
            x0_fn, sigmas = gen.x0_fn(), tuple(gen.sigmas)
        cols = []
        for k in range(len(sigmas)):
            score, _, _ = score_sampler(truncated(x0_fn, sigmas, k), classifier, test.images, 1000, 500, 1234)
            cols.append(f"step {k}: FD {score.fd:.4f} acc {score.accuracy:.3f}")
        print(path, " | ".join(cols), flush=True)


if __name__ == "__main__":
    main()
