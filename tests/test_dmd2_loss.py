"""The DMD2 loss of METHODS.md on a case small enough to compute by hand, through the ops switch."""

import pytest
import torch

from fastdmd import ops


@pytest.fixture(autouse=True)
def reference_backend():
    old = ops.backend
    ops.backend = "reference"
    yield
    ops.backend = old


def test_hand_computed_case():
    # One sample, two elements, flow parametrization a = 1, b = -s with s = 0.5.
    x0 = torch.tensor([[1.0, -1.0]], requires_grad=True)
    x_t = torch.tensor([[0.0, 2.0]])
    cond, uncond, fake = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, 2.0]])
    a, b, g = torch.tensor([1.0]), torch.tensor([-0.5]), 2.0
    # CFG: pred_real = uncond + 2 * (cond - uncond) = [2, 0]
    # x0_real = x_t - 0.5 * [2, 0] = [-1, 2];  x0_fake = x_t - 0.5 * [-1, 2] = [0.5, 1]
    # p_real = x0 - x0_real = [2, -3]; normalizer = 2.5 (+1e-8)
    # grad = (x0_fake - x0_real) / 2.5 = [1.5, -1] / 2.5 = [0.6, -0.4]
    # target = x0 - grad = [0.4, -0.6]; loss = 0.5 * mean(grad^2) = 0.5 * (0.36 + 0.16) / 2 = 0.13
    # cosine(grad, p_real) = (1.2 + 1.2) / (sqrt(0.52) * sqrt(13))
    out = ops.dmd_target(x0, x_t, cond, uncond, fake, a, b, g)
    assert out.loss.item() == pytest.approx(0.13, abs=1e-6)
    torch.testing.assert_close(out.target, torch.tensor([[0.4, -0.6]]))
    assert out.normalizer.item() == pytest.approx(2.5, abs=1e-6)
    assert out.grad_sq.item() == pytest.approx(0.26, abs=1e-6)
    assert out.cosine.item() == pytest.approx(2.4 / (0.52**0.5 * 13**0.5), abs=1e-6)
    out.loss.backward()
    # d loss / d x0 = grad / N with N = 2
    torch.testing.assert_close(x0.grad, torch.tensor([[0.3, -0.2]]))


def test_gradient_is_weighted_grad_over_numel():
    torch.manual_seed(0)
    x0 = torch.randn(3, 2, 5, 7, requires_grad=True)
    x_t, cond, uncond, fake = (torch.randn(3, 2, 5, 7) for _ in range(4))
    a, b, w = torch.rand(3), -torch.rand(3), torch.tensor([0.0, 1.0, 2.5])
    out = ops.dmd_target(x0, x_t, cond, uncond, fake, a, b, 1.7, weights=w)
    out.loss.backward()
    grad = x0.detach() - out.target
    torch.testing.assert_close(x0.grad, w.view(3, 1, 1, 1) * grad / x0.numel())
    assert torch.count_nonzero(x0.grad[0]) == 0


def test_non_finite_teacher_output_gives_zero_gradient_not_nan():
    x0 = torch.zeros(2, 4, requires_grad=True)
    cond = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    out = ops.dmd_target(x0, torch.ones(2, 4), cond, None, torch.zeros(2, 4), torch.ones(2), -torch.ones(2), 1.0)
    out.loss.backward()
    assert torch.isfinite(x0.grad).all()
    assert torch.isfinite(out.target).all()
    assert torch.count_nonzero(x0.grad[1]) > 0  # the healthy sample still learns


def test_guidance_without_uncond_is_rejected():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="real_uncond"):
        ops.dmd_target(x, x, x, None, x, torch.ones(1), torch.ones(1), 2.0)
