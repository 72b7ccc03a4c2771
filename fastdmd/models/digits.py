"""The digits family: a small class-conditional diffusers UNet trained with rectified flow, and a
small CNN classifier whose features define FD and whose log-probabilities are a reward.

Flow convention (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1 - s) x0 + s eps, the model
predicts the velocity v = eps - x0 at timestep 1000 * s, so x0_pred = x_t - s * v (a = 1, b = -s).
Label NULL_LABEL (10) is the unconditional class used for classifier-free guidance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import load_file

from fastdmd.data.digits import IMAGE_SIZE, NUM_CLASSES

NULL_LABEL = NUM_CLASSES
ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
TEACHER_FILE = "digits_teacher.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
MANIFEST_FILE = "digits_manifest.json"

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    num_class_embeds=NUM_CLASSES + 1,
)


def build_digits_unet(**overrides) -> UNet2DModel:
    return UNet2DModel(**{**UNET_CONFIG, **overrides})


@dataclass(frozen=True)
class DigitsFlowAdapter:
    """Rectified-flow parametrization of the digits UNet (velocity prediction)."""

    num_train_timesteps: int = 1000

    def add_noise(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * eps

    def x0_coeffs(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (a, b) with x0_pred = a * x_t + b * pred."""
        return torch.ones_like(sigma), -sigma

    def to_x0(self, x_t: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        a, b = self.x0_coeffs(sigma)
        shape = (-1, *([1] * (x_t.dim() - 1)))
        return a.view(shape) * x_t + b.view(shape) * pred

    def target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict (the velocity)."""
        return eps - x0

    def predict(self, model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(x_t, sigma * self.num_train_timesteps, class_labels=labels).sample

    def predict_cfg(self, model, x_t, sigma, labels, guidance_scale: float) -> torch.Tensor:
        """pred_cfg = uncond + g * (cond - uncond); g = 1 skips the unconditional forward."""
        if guidance_scale == 1.0:
            return self.predict(model, x_t, sigma, labels)
        cond, uncond = self.predict_cond_uncond(model, x_t, sigma, labels)
        return uncond + guidance_scale * (cond - uncond)

    def predict_cond_uncond(self, model, x_t, sigma, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional predictions batched as one forward."""
        null = torch.full_like(labels, NULL_LABEL)
        out = self.predict(model, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        return out.chunk(2)


class DigitsClassifier(nn.Module):
    """A small CNN on 16x16 digits: `forward` gives logits, `fd_features` feed FD."""

    feature_dim = 128  # width of the penultimate layer

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.fc(self.conv(x).flatten(1))))

    def fd_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled last conv activations (64-d), the analogue of Inception's pool3.

        Chosen over the 128-d penultimate layer because FD's small-sample bias there swamps the
        signal: at 1,000 vs 1,000 real digits it reads 18.4, as much as the teacher's 12-step samples,
        while on pooled features real-vs-real is about 5x below the teacher's 4-step samples."""
        return self.conv(x).mean(dim=(2, 3))


def load_digits_assets(assets_dir: str = ASSETS_DIR) -> tuple[UNet2DModel, DigitsClassifier, dict]:
    """Load the shipped teacher UNet, classifier and the manifest that says how they were made."""
    paths = {name: os.path.join(assets_dir, name) for name in (TEACHER_FILE, CLASSIFIER_FILE, MANIFEST_FILE)}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"digits assets missing: {missing}; they ship with fastdmd, or rebuild them with `python -m fastdmd.teacher`"
        )
    with open(paths[MANIFEST_FILE]) as f:
        manifest = json.load(f)
    teacher = build_digits_unet(**manifest.get("unet_config_overrides", {}))
    teacher.load_state_dict(load_file(paths[TEACHER_FILE]))
    classifier = DigitsClassifier()
    classifier.load_state_dict(load_file(paths[CLASSIFIER_FILE]))
    return teacher.eval().requires_grad_(False), classifier.eval().requires_grad_(False), manifest
