"""The prompt-alignment reward of the digits family: how sure the shipped digits classifier is that
an image shows the requested digit (the digits analogue of GenEval / a CLIP score; DMDR's ImageNet
reward is the same thing with a DINOv2 classifier: 0.05 * cross-entropy, i.e. -0.05 * this score)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from fastdmd.rewards.base import Reward


class ClassifierLogProb(Reward):
    """log p_classifier(label | image), differentiable w.r.t. the images.

    Images are clamped to [-1, 1] first, as the evaluation (metrics.py) and DMDR's decoder
    (`clamp(0, 1)` after decoding) do: the reward cannot be raised by pushing pixels outside the
    data range, and pixels outside it get no reward gradient. The classifier stays frozen (its
    parameters never receive gradients); labels must be class indices in [0, 10).
    """

    name = "classifier_log_prob"
    differentiable = True

    def __init__(self, classifier: nn.Module):
        self.classifier = classifier.eval().requires_grad_(False)

    def score(self, images, labels, dmd):
        param = next(self.classifier.parameters())
        logits = self.classifier(images.clamp(-1, 1).to(param.dtype))
        return F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None].long()).squeeze(1)
