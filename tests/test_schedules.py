"""DMDR's annealed schedules (fastdmd/objectives/schedules.py)."""

import math

import numpy as np
import pytest
import torch

from fastdmd.objectives.schedules import (cosine_decay, real_lora_scale, renoise_beta_params,
                                          sample_renoise_sigma)


def test_beta_params_endpoints_and_monotone_path():
    assert renoise_beta_params(0, 10_000) == (4.0, 1.5)
    assert renoise_beta_params(10_000, 10_000) == (1.0, 1.0)
    assert renoise_beta_params(25_000, 10_000) == (1.0, 1.0)  # stays U(0, 1) after the annealing
    path = [renoise_beta_params(step, 100) for step in range(101)]
    alphas, betas = np.array(path).T
    assert (np.diff(alphas) < 0).all() and (np.diff(betas) < 0).all()
    # cosine, not linear: halfway is exactly the midpoint, a quarter in is past a quarter of the way
    assert renoise_beta_params(50, 100) == pytest.approx((2.5, 1.25))
    assert renoise_beta_params(25, 100)[0] == pytest.approx(1 + 3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert renoise_beta_params(0, 10, start=(2.0, 3.0)) == (2.0, 3.0)


def test_sigma_samples_follow_the_annealed_beta():
    g = torch.Generator().manual_seed(0)
    early = sample_renoise_sigma(20_000, 0, 1000, g)
    late = sample_renoise_sigma(20_000, 1000, 1000, g)
    assert early.dtype == torch.float32 and early.shape == (20_000,)
    assert ((early > 0) & (early < 1)).all()
    assert early.mean().item() == pytest.approx(4.0 / 5.5, abs=0.01)   # Beta(4, 1.5): heavy noise
    assert late.mean().item() == pytest.approx(0.5, abs=0.01)          # U(0, 1)
    assert late.var().item() == pytest.approx(1 / 12, abs=0.005)
    squeezed = sample_renoise_sigma(20_000, 1000, 1000, g, sigma_range=(0.02, 0.98))
    assert squeezed.min() >= 0.02 and squeezed.max() <= 0.98     # DMD2's U[0.02, 0.98] at the end


def test_sigma_samples_are_reproducible_from_the_generator():
    a = sample_renoise_sigma(8, 3, 10, torch.Generator().manual_seed(5))
    b = sample_renoise_sigma(8, 3, 10, torch.Generator().manual_seed(5))
    c = sample_renoise_sigma(8, 3, 10, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_real_lora_scale_decays_from_start_to_zero():
    assert real_lora_scale(0, 10_000) == 0.75
    assert real_lora_scale(10_000, 10_000) == 0.0 and real_lora_scale(12_000, 10_000) == 0.0
    assert real_lora_scale(5_000, 10_000) == pytest.approx(0.375)
    scales = [real_lora_scale(s, 200) for s in range(201)]
    assert all(a > b for a, b in zip(scales, scales[1:]))
    assert cosine_decay(0, 7) == 1.0 and cosine_decay(7, 7) == 0.0


def test_argument_errors():
    with pytest.raises(ValueError, match="total must be a positive int .*got 0"):
        cosine_decay(0, 0)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        real_lora_scale(-1, 10)
    with pytest.raises(ValueError, match="Beta parameters must be > 0, got start beta = 0.0"):
        renoise_beta_params(0, 10, start=(4.0, 0.0))
    with pytest.raises(ValueError, match=r"sigma_range must satisfy 0 <= lo < hi <= 1, got \(0.5, 0.2\)"):
        sample_renoise_sigma(4, 0, 10, sigma_range=(0.5, 0.2))
