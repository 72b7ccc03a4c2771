"""The digits family: a small class-conditional diffusers UNet trained with rectified flow
(fastdmd.models.flow), and a small CNN classifier whose features define FD and whose
log-probabilities are a reward. Label NULL_LABEL (10) is the unconditional class used for
classifier-free guidance.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import load_file

from fastdmd.data.digits import IMAGE_SIZE, NUM_CLASSES
from fastdmd.models.flow import FlowAdapter

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


class DigitsFlowAdapter(FlowAdapter):
    """The digits UNet's conditioning: class embeddings, NULL_LABEL for the unconditional input."""

    null_index = NULL_LABEL

    def predict(self, model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype  # a bf16 copy (perf.rollout_weights) takes bf16 inputs
        return model(x_t.to(dtype), sigma * self.num_train_timesteps, class_labels=labels).sample


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


def load_digits_assets(assets_dir: str = ASSETS_DIR, teacher_weights: bool = True
                       ) -> tuple[UNet2DModel, DigitsClassifier, dict]:
    """Load the shipped teacher UNet, classifier and the manifest that says how they were made; with
    `teacher_weights` False the teacher is built on the meta device instead (its weights come later, from
    rank 0)."""
    paths = {name: os.path.join(assets_dir, name) for name in (TEACHER_FILE, CLASSIFIER_FILE, MANIFEST_FILE)}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"digits assets missing: {missing}; they ship with fastdmd, or rebuild them with `python -m fastdmd.teacher`"
        )
    with open(paths[MANIFEST_FILE]) as f:
        manifest = json.load(f)
    with torch.device("cpu" if teacher_weights else "meta"):
        teacher = build_digits_unet(**manifest.get("unet_config_overrides", {}))
    if teacher_weights:
        teacher.load_state_dict(load_file(paths[TEACHER_FILE]))
    classifier = DigitsClassifier()
    classifier.load_state_dict(load_file(paths[CLASSIFIER_FILE]))
    return teacher.eval().requires_grad_(False), classifier.eval().requires_grad_(False), manifest
