"""Evaluation metrics: Frechet distance on the digits classifier's features, class accuracy,
and sampler throughput."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from fastdmd.data.digits import NUM_CLASSES


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


@dataclass
class SamplerScore:
    fd: float
    accuracy: float
    samples_per_s: float
    rewards: dict[str, float]  # mean score of each reward model given to score_sampler

    def as_dict(self) -> dict:
        return {"fd": self.fd, "accuracy": self.accuracy, "samples_per_s": self.samples_per_s, "rewards": self.rewards}


@torch.no_grad()
def score_sampler(
    sample_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    classifier: torch.nn.Module,
    real_images: torch.Tensor,
    num_samples: int,
    batch_size: int,
    seed: int,
    rewards: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[SamplerScore, torch.Tensor, torch.Tensor]:
    """Draw num_samples with balanced labels from sample_fn(noise, labels), score FD against
    real_images on classifier features, accuracy on the requested labels and the mean of each
    reward(images, labels)."""
    device = next(classifier.parameters()).device  # samplers run where the classifier (and the models) live
    labels = balanced_labels(num_samples)
    noise = torch.randn((num_samples, *real_images.shape[1:]), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    # .float(): networks sharded with a bf16 policy return bf16 samples; the classifier is fp32
    images = torch.cat([sample_fn(noise[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)).float().cpu()
                        for i in range(0, num_samples, batch_size)])
    elapsed = time.perf_counter() - start
    feats, logits = [], []
    for i in range(0, num_samples, batch_size):
        batch = images[i:i + batch_size].clamp(-1, 1).to(device)
        feats.append(classifier.fd_features(batch).cpu())
        logits.append(classifier(batch).cpu())
    real_feats = torch.cat([classifier.fd_features(real_images[i:i + batch_size].to(device)).cpu()
                            for i in range(0, len(real_images), batch_size)])
    fd = frechet_distance(torch.cat(feats), real_feats)
    accuracy = (torch.cat(logits).argmax(1) == labels).float().mean().item()
    means = {name: torch.cat([fn(images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)).cpu()
                              for i in range(0, num_samples, batch_size)]).mean().item()
             for name, fn in (rewards or {}).items()}
    return SamplerScore(fd, accuracy, num_samples / elapsed, means), images, labels
