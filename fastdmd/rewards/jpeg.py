"""JPEG compressibility, the aesthetic-like second reward (DDPO's "compressibility"): images that
encode to fewer bytes (smooth, clean strokes, little noise) score higher."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from fastdmd.ops.checks import check_number
from fastdmd.rewards.base import Reward


class JpegCompressibility(Reward):
    """Minus the JPEG size in kilobytes (1 kB = 1000 bytes, as DDPO), one encode per image.

    Encoding: clamp to [-1, 1], quantize to uint8 with round((x + 1) * 127.5), upscale by an
    integer factor with nearest neighbour (each pixel becomes an `upscale` x `upscale` block),
    encode with Pillow at `quality` (standard Huffman tables, no `optimize`), read the byte count.
    The upscale matters on 16x16 digits: at native size the image is 4 JPEG blocks and the fixed
    header (about 330 bytes) dominates, so a noise image (582 bytes) lands inside the range of 200
    test digits (462 to 597); at 4x, they take 613 to 1434 bytes, noise 2953 and a blank image 380.
    Deterministic for a given Pillow/libjpeg build. Not differentiable: the scores are constants
    (`requires_grad` False); use it through group advantages, never by backprop.
    Channels: 1 (grayscale) or 3 (RGB).
    """

    name = "jpeg_compressibility"
    differentiable = False

    def __init__(self, quality: int = 95, upscale: int = 4):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be an int in [1, 100], got {quality!r}")
        check_number("upscale", upscale, minimum=1)
        if int(upscale) != upscale:
            raise ValueError(f"upscale must be a positive integer factor, got {upscale!r}")
        self.quality, self.upscale = quality, int(upscale)

    def score(self, images, labels, dmd):
        if images.shape[1] not in (1, 3):
            raise ValueError(f"JPEG compressibility takes 1 (grayscale) or 3 (RGB) channels, "
                             f"got {images.shape[1]} (shape {tuple(images.shape)})")
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = pixels.repeat_interleave(self.upscale, dim=2).repeat_interleave(self.upscale, dim=3)
        sizes = [self.encoded_bytes(image) for image in pixels.permute(0, 2, 3, 1).cpu().numpy()]
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device) / 1000.0

    def encoded_bytes(self, image: np.ndarray) -> int:
        """JPEG size of one [H, W, C] uint8 image."""
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=self.quality)
        return buffer.tell()
