"""GDMD's per-target advantages and weights (fastdmd/objectives/gdmd.py, weights.py)."""

import pytest
import torch

from fastdmd import ops
from fastdmd.objectives.gdmd import target_advantages
from fastdmd.objectives.weights import gdmd_weights


@pytest.fixture
def advantages():
    """Advantages of K = 4 targets per sample for 3 samples, as GDMD builds them."""
    rewards = torch.tensor([[0.1, 0.9, 0.4, 0.2], [3.0, 1.0, 2.0, 2.5], [0.0, 0.0, 0.0, 0.0]])
    return target_advantages(rewards[..., None], torch.ones(1), eps=1e-6, clip=5.0)


def test_target_advantages_are_the_methods_formula_down_to_nearly_equal_rewards():
    """A_k = clip((r_k - mean_k r) / (std_k r + eps), -c, c), rewards spread far below eps included:
    their advantages shrink toward 0 (weights toward 1). ops.group_advantages standardizes the fused
    sum a second time, which undoes the eps (full-strength weights from differences of 1e-6)."""
    r = torch.tensor([[0.0, 2.4e-6, -1.6e-6, 0.6e-6], [0.0, 1.2e-8, -0.8e-8, 0.3e-8], [1.0, 9.0, 3.0, 4.0]],
                     dtype=torch.float64)
    want = ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-6)).clamp(-1.5, 1.5)
    got = target_advantages(r[..., None], torch.ones(1, dtype=torch.float64), eps=1e-6, clip=1.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got[1].abs().max() < 0.02 and got[2].abs().max() == 1.5  # near-equal: ~0; spread: clipped
    twice = ops.reference.group_advantages(r.reshape(12, 1), group_size=4, clip=1.5).advantages.reshape(3, 4)
    assert twice[0].abs().max() > 1.6 * got[0].abs().max()  # what the op gives: std / (std + eps) undone
    # Several rewards: each standardized (so its scale and offset do not count), then summed with the weights.
    two = torch.stack([r[2:], 1000 * r[2:] + 7], dim=-1)
    torch.testing.assert_close(target_advantages(two, torch.tensor([0.25, 0.5], dtype=torch.float64), 1e-6, 9.0),
                               0.75 * target_advantages(r[2:, :, None], torch.ones(1, dtype=torch.float64), 1e-6, 9.0),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["linear", "softmax", "signed"])
def test_weights_preserve_the_order_of_advantages(advantages, mode):
    w = gdmd_weights(advantages, mode=mode, lam=0.8, tau=0.5)
    assert w.shape == (3, 4) and w.dtype == torch.float32
    for a_row, w_row in zip(advantages, w):
        order = a_row.argsort()
        assert (w_row[order].diff() >= 0).all()
    # a group without reward signal (all advantages 0) is plain DMD: weight 1 everywhere
    torch.testing.assert_close(w[2], torch.ones(4))


def test_linear_weights(advantages):
    w = gdmd_weights(advantages, mode="linear", lam=0.5)
    torch.testing.assert_close(w, (1 + 0.5 * advantages).clamp_min(0))
    torch.testing.assert_close(w.mean(dim=1), torch.ones(3))  # no weight floored at lam = 0.5, K = 4
    steep = gdmd_weights(advantages, mode="linear", lam=2.0)
    assert (steep >= 0).all() and (steep == 0).any()           # the worst targets are dropped


def test_softmax_weights_sum_to_k(advantages):
    w = gdmd_weights(advantages, mode="softmax", tau=0.5)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.full((3,), 4.0))
    torch.testing.assert_close(w, 4 * torch.softmax(advantages / 0.5, dim=1))
    cold = gdmd_weights(advantages, mode="softmax", tau=1e-3)
    assert cold[0].argmax() == advantages[0].argmax() and cold[0].max() == pytest.approx(4.0)


def test_signed_weights_push_away_from_bad_targets(advantages):
    w = gdmd_weights(advantages, mode="signed", lam=2.0)
    torch.testing.assert_close(w, 1 + 2.0 * advantages)
    assert (w < 0).any()
    torch.testing.assert_close(w.mean(dim=1), torch.ones(3))


def test_argument_errors(advantages):
    with pytest.raises(ValueError, match=r"mode must be one of \('linear', 'softmax', 'signed'\), got 'exp'"):
        gdmd_weights(advantages, mode="exp")
    with pytest.raises(ValueError, match="lam must be >= 0, got -1"):
        gdmd_weights(advantages, lam=-1)
    with pytest.raises(ValueError, match="tau must be > 0"):
        gdmd_weights(advantages, mode="softmax", tau=0.0)
    with pytest.raises(ValueError, match=r"advantages must be a non-empty \[B, K\] tensor.*got shape \(12,\)"):
        gdmd_weights(advantages.reshape(12))
