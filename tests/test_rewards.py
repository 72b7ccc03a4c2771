"""Rewards (fastdmd/rewards): the digits classifier, JPEG compressibility, the R_dm proxies and
their combination, on real digits where it matters."""

import pytest
import torch

from fastdmd import ops
from fastdmd.data import load_digits
from fastdmd.models.digits import load_digits_assets
from fastdmd.rewards import (ClassifierLogProb, CombinedReward, DistributionMatchingReward, JpegCompressibility,
                             Reward)


@pytest.fixture(scope="module")
def classifier():
    return load_digits_assets()[1]


@pytest.fixture(scope="module")
def digits():
    test = load_digits("test")
    return test.images[:100], test.labels[:100]


def test_classifier_reward_is_the_log_prob_of_the_requested_class(classifier, digits):
    images, labels = digits
    reward = ClassifierLogProb(classifier)
    per_class = torch.stack([reward(images, torch.full_like(labels, c)) for c in range(10)], dim=1)
    # log-probabilities: they normalize over the ten classes
    torch.testing.assert_close(per_class.logsumexp(dim=1), torch.zeros(len(labels)), atol=1e-5, rtol=0)
    assert per_class.dtype == torch.float32


def test_classifier_reward_prefers_the_true_label(classifier, digits):
    images, labels = digits
    reward = ClassifierLogProb(classifier)
    right = reward(images, labels)
    wrong = reward(images, (labels + 1) % 10)
    assert (right > wrong).float().mean() >= 0.95  # the classifier is 97% accurate on this split
    assert (right - wrong).mean() > 5.0


def test_classifier_reward_gradient_flows_to_images_and_raises_the_score(classifier, digits):
    # scaled by 1.1: the background (-1.1) lies outside [-1, 1], the strokes partly inside
    images, labels = digits[0][:16] * 1.1, (digits[1][:16] + 3) % 10
    images.requires_grad_(True)
    reward = ClassifierLogProb(classifier)
    scores = reward(images, labels)
    scores.sum().backward()
    grad = images.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in classifier.parameters())
    # pixels outside [-1, 1] are clamped: no gradient there
    inside = images.detach().abs() <= 1
    assert (grad[~inside] == 0).all() and grad[inside].abs().sum() > 0
    # a small ascent step along the gradient raises every score
    with torch.no_grad():
        stepped = reward(images + 1e-3 * grad.sign() * inside, labels)
    assert (stepped > scores.detach()).all()
    reward.require_differentiable("DMDR")


def test_jpeg_ranks_blank_above_digits_above_noise(digits):
    reward = JpegCompressibility()
    noise = torch.rand((4, 1, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    blank = -torch.ones(4, 1, 16, 16)
    labels = torch.zeros(4, dtype=torch.long)
    r_blank, r_noise = reward(blank, labels), reward(noise, labels)
    r_digits = reward(*digits)  # 100 digits: at native 16x16 (no upscale) noise would beat some of them
    assert (r_blank[:, None] > r_digits[None, :]).all()
    assert (r_digits[:, None] > r_noise[None, :]).all()
    assert (r_blank < 0).all()  # minus a size in kB
    torch.testing.assert_close(reward(noise, labels), r_noise, rtol=0, atol=0)  # deterministic


def test_jpeg_quantizes_to_uint8_before_encoding():
    reward = JpegCompressibility()
    image = torch.rand((1, 1, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.zeros(1, dtype=torch.long)
    # a perturbation far below one grey level (2/255) changes no pixel after rounding
    nudged = image + 1e-4 * torch.sign(torch.randn(image.shape, generator=torch.Generator().manual_seed(2)))
    levels = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    if torch.equal(levels(image), levels(nudged)):
        assert reward(image, labels) == reward(nudged, labels)
    # values outside [-1, 1] encode as the clamped image
    assert reward(image * 3, labels) == reward((image * 3).clamp(-1, 1), labels)


def test_jpeg_is_not_differentiable_and_says_so(digits):
    images = digits[0][:2].clone().requires_grad_(True)
    reward = JpegCompressibility()
    scores = reward(images, digits[1][:2])
    assert not scores.requires_grad and reward.differentiable is False
    with pytest.raises(ValueError, match="jpeg_compressibility.*not differentiable"):
        reward.require_differentiable("DMDR")


def test_jpeg_argument_errors():
    with pytest.raises(ValueError, match=r"quality must be an int in \[1, 100\], got 0"):
        JpegCompressibility(quality=0)
    with pytest.raises(ValueError, match="upscale must be a positive integer"):
        JpegCompressibility(upscale=1.5)
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, got 2"):
        JpegCompressibility()(torch.zeros(1, 2, 8, 8), torch.zeros(1, dtype=torch.long))


def _dmd_stats(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, 4, 4)
    x0, x_t, real, fake = (torch.randn(shape, generator=g) for _ in range(4))
    sigma = torch.rand(batch, generator=g)
    a, b = torch.ones(batch), -sigma
    out = ops.reference.dmd_target(x0, x_t, real, None, fake, a, b)
    x0_real = x_t - sigma.view(-1, 1, 1, 1) * real
    x0_fake = x_t - sigma.view(-1, 1, 1, 1) * fake
    return out, x0, x0_real, x0_fake


def test_distribution_matching_proxies():
    dmd, x0, x0_real, x0_fake = _dmd_stats()
    images, labels = x0, torch.zeros(x0.shape[0], dtype=torch.long)
    torch.testing.assert_close(DistributionMatchingReward("grad_sq")(images, labels, dmd), -dmd.grad_sq)
    # the disagreement proxy is the raw, unnormalized denoiser disagreement
    disagreement = ((x0_fake - x0_real) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(DistributionMatchingReward("disagreement")(images, labels, dmd), -disagreement)
    torch.testing.assert_close(DistributionMatchingReward("alignment")(images, labels, dmd), -dmd.cosine)
    # a sample on which teacher and critic agree gets the best grad_sq score (0)
    agree = ops.reference.dmd_target(x0, x0, x0_real, None, x0_real, torch.ones(6), torch.zeros(6))
    assert (DistributionMatchingReward()(images, labels, agree) == 0).all()


def test_distribution_matching_errors():
    dmd, x0, _, _ = _dmd_stats()
    labels = torch.zeros(x0.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match="must be one of .*'grad_sq'.*got 'kl'"):
        DistributionMatchingReward("kl")
    with pytest.raises(ValueError, match="call it with dmd=ops.dmd_target"):
        DistributionMatchingReward()(x0, labels)
    with pytest.raises(ValueError, match="shape \\(6,\\) but there are 3 images"):
        DistributionMatchingReward()(x0[:3], labels[:3], dmd)


def test_combined_reward_matrix_weights_and_sum(classifier, digits):
    images, labels = digits[0][:8], digits[1][:8]
    parts = [ClassifierLogProb(classifier), JpegCompressibility()]
    combined = CombinedReward(parts, [1.0, -0.5])
    s = combined.scores(images, labels)
    assert s.per_reward.shape == (8, 2) and s.weights.tolist() == [1.0, -0.5]
    for k, part in enumerate(parts):
        torch.testing.assert_close(s.per_reward[:, k], part(images, labels))
    torch.testing.assert_close(s.total, s.per_reward[:, 0] - 0.5 * s.per_reward[:, 1])
    torch.testing.assert_close(combined(images, labels), s.total)
    assert combined.name == "1*classifier_log_prob + -0.5*jpeg_compressibility"
    # the matrix and weights are what ops.group_advantages takes
    adv = ops.group_advantages(s.per_reward, group_size=4, weights=s.weights)
    assert adv.advantages.shape == (8,) and adv.group_mean.shape == (2, 2)


def test_combined_reward_differentiability_is_that_of_its_parts(classifier, digits):
    images = digits[0][:4].clone().requires_grad_(True)
    labels = digits[1][:4]
    only_classifier = CombinedReward([ClassifierLogProb(classifier)])
    assert only_classifier.differentiable
    only_classifier(images, labels).sum().backward()
    assert images.grad.abs().sum() > 0
    mixed = CombinedReward([ClassifierLogProb(classifier), JpegCompressibility()])
    assert not mixed.differentiable
    with pytest.raises(ValueError, match="RTDMD last step .* 'jpeg_compressibility' is not differentiable"):
        mixed.require_differentiable("RTDMD last step")


def test_combined_reward_passes_dmd_stats_to_r_dm(classifier):
    dmd, x0, _, _ = _dmd_stats(batch=6)
    images = x0.repeat(1, 1, 4, 4)  # 16x16 for the classifier
    labels = torch.arange(6)
    combined = CombinedReward([ClassifierLogProb(classifier), DistributionMatchingReward()], [1.0, 2.0])
    s = combined.scores(images, labels, dmd=dmd)
    torch.testing.assert_close(s.per_reward[:, 1], -dmd.grad_sq)


def test_interface_errors(classifier):
    reward = ClassifierLogProb(classifier)
    with pytest.raises(ValueError, match="images must be a non-empty \\[B, C, H, W\\] tensor, got shape \\(16, 16\\)"):
        reward(torch.zeros(16, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape \\(2,\\), got \\(3,\\)"):
        reward(torch.zeros(2, 1, 16, 16), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="got 1 weights for 2 rewards"):
        CombinedReward([reward, JpegCompressibility()], [1.0])
    with pytest.raises(ValueError, match="weight of reward 'jpeg_compressibility' must be a finite number, got nan"):
        CombinedReward([reward, JpegCompressibility()], [1.0, float("nan")])
    assert isinstance(reward, Reward)
