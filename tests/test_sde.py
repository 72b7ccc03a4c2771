"""The CPS SDE sampler with log-probs and SubGRPO (fastdmd/rollout/sde.py)."""

import copy
import math

import pytest
import torch

from fastdmd.models.digits import DigitsFlowAdapter, load_digits_assets
from fastdmd.rollout import euler_sample
from fastdmd.rollout.sde import (cps_mean_std, cps_step, group_shared_noise, policy_loss, sde_rollout,
                                 step_log_prob, subgrpo_steps)

SIGMAS = [1.0, 0.75, 0.5, 0.25]
ADAPTER = DigitsFlowAdapter()


@pytest.fixture(scope="module")
def teacher():
    return load_digits_assets()[0]


def velocity_of(net):
    return lambda x, s, y: ADAPTER.predict(net, x, s, y)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_step_log_prob_is_the_elementwise_mean_gaussian_log_density():
    mean, noise = _randn(5, 1, 4, 6, seed=1), _randn(5, 1, 4, 6, seed=2)
    std = torch.tensor([0.05, 0.1, 0.3, 0.7, 1.2])
    x_next = mean + std.view(-1, 1, 1, 1) * noise
    expected = torch.distributions.Normal(mean.double(), std.double().view(-1, 1, 1, 1)).log_prob(x_next.double())
    lp = step_log_prob(x_next, mean, std)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), expected.flatten(1).mean(1), atol=1e-6, rtol=1e-6)
    # bf16 states are still scored in fp32
    assert step_log_prob(x_next.bfloat16(), mean.bfloat16(), std).dtype == torch.float32


def test_cps_step_formula():
    x, v, xi = _randn(3, 1, 2, 2, seed=3), _randn(3, 1, 2, 2, seed=4), _randn(3, 1, 2, 2, seed=5)
    s, s_next, eta = torch.tensor([0.9, 0.6, 0.3]), 0.2, 0.9
    out = cps_step(x, v, s, s_next, eta, xi)
    sb = s.view(-1, 1, 1, 1)
    x0, eps_hat = x - sb * v, x + (1 - sb) * v
    c, d = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    torch.testing.assert_close(out.mean, (1 - s_next) * x0 + s_next * c * eps_hat)
    torch.testing.assert_close(out.std, torch.full((3,), s_next * d))
    torch.testing.assert_close(out.x_next, out.mean + s_next * d * xi)


def test_eta_zero_is_the_euler_ddim_step_and_eta_one_renoises_x0():
    x, v, xi = _randn(2, 1, 3, 3, seed=6), _randn(2, 1, 3, 3, seed=7), _randn(2, 1, 3, 3, seed=8)
    ode = cps_step(x, v, 0.75, 0.5, 0.0, xi)
    torch.testing.assert_close(ode.x_next, x + (0.5 - 0.75) * v)
    assert torch.equal(ode.std, torch.zeros(2))
    renoise = cps_step(x, v, 0.75, 0.5, 1.0, xi)  # the DMD2 sampler: (1 - s') x0 + s' xi
    torch.testing.assert_close(renoise.x_next, 0.5 * (x - 0.75 * v) + 0.5 * xi)


def test_cps_preserves_coefficients_for_the_exact_velocity():
    # With x = (1 - s) x0 + s eps and v = eps - x0, the step lands on (1 - s') x0 + s' eps' with
    # eps' = cos * eps + sin * xi, unit variance: the marginal at s' is preserved.
    x0, eps, xi = _randn(4, 1, 4, 4, seed=9), _randn(4, 1, 4, 4, seed=10), _randn(4, 1, 4, 4, seed=11)
    s, s_next, eta = 0.8, 0.35, 0.7
    out = cps_step((1 - s) * x0 + s * eps, eps - x0, s, s_next, eta, xi)
    c, d = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    torch.testing.assert_close(out.x_next, (1 - s_next) * x0 + s_next * (c * eps + d * xi))


def test_rollout_without_stochastic_steps_is_the_euler_sampler(teacher):
    noise, labels = _randn(4, 1, 16, 16, seed=12), torch.arange(4)
    rollout = sde_rollout(velocity_of(teacher), noise, labels, SIGMAS, eta=0.9, stochastic_steps=())
    with torch.no_grad():
        euler = euler_sample(lambda x, s: velocity_of(teacher)(x, s, labels), noise, SIGMAS)
    torch.testing.assert_close(rollout.sample, euler, atol=1e-5, rtol=1e-5)
    assert torch.isnan(rollout.log_probs).all() and rollout.stochastic == ()


def test_rollout_records_a_consistent_trajectory(teacher):
    noise, labels = _randn(6, 1, 16, 16, seed=13), torch.arange(6) % 10
    v_fn = velocity_of(teacher)
    rollout = sde_rollout(v_fn, noise, labels, SIGMAS, eta=0.9, generator=torch.Generator().manual_seed(0))
    assert rollout.stochastic == (0, 1, 2) and rollout.sigmas == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert rollout.trajectory.shape == (5, 6, 1, 16, 16) and rollout.log_probs.shape == (4, 6)
    torch.testing.assert_close(rollout.trajectory[0], noise)
    for i in range(3):  # each stochastic transition is a draw from N(mean, std^2) of its own step
        s, s_next = rollout.sigmas[i], rollout.sigmas[i + 1]
        torch.testing.assert_close(rollout.stds[i], torch.full((6,), s_next * math.sin(0.45 * math.pi)))
        residual = (rollout.trajectory[i + 1] - rollout.means[i]) / rollout.stds[i].view(-1, 1, 1, 1)
        assert 0.8 < residual.std() < 1.2
        torch.testing.assert_close(rollout.log_probs[i],
                                   step_log_prob(rollout.trajectory[i + 1], rollout.means[i], rollout.stds[i]))
    # the last step is the deterministic x0 prediction
    x_last = rollout.trajectory[3]
    with torch.no_grad():
        x0_pred = x_last - 0.25 * v_fn(x_last, torch.full((6,), 0.25), labels)
    torch.testing.assert_close(rollout.sample, x0_pred)
    assert torch.equal(rollout.stds[3], torch.zeros(6)) and torch.isnan(rollout.log_probs[3]).all()
    # the same generator state gives the same rollout
    again = sde_rollout(v_fn, noise, labels, SIGMAS, eta=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.trajectory, rollout.trajectory)


def test_on_policy_ratio_is_exactly_one_and_gradients_reach_the_policy(teacher):
    policy = copy.deepcopy(teacher).requires_grad_(True)
    noise, labels = _randn(6, 1, 16, 16, seed=14), torch.arange(6)
    rollout = sde_rollout(velocity_of(policy), noise, labels, SIGMAS, eta=0.9,
                          generator=torch.Generator().manual_seed(1))
    advantages = torch.linspace(-1, 1, 6)
    for step in rollout.stochastic:
        out = policy_loss(velocity_of(policy), rollout, step, labels, advantages, clip_range=1e-5)
        assert torch.equal(out.log_prob, rollout.log_probs[step])
        assert torch.equal(out.ratio, torch.ones(6)) and torch.equal(out.clip_frac, torch.zeros(6))
        policy.zero_grad()
        out.loss.mean().backward()
        assert sum(p.grad.abs().sum() for p in policy.parameters() if p.grad is not None) > 0
    with pytest.raises(ValueError, match="step 3 is not a stochastic step"):
        policy_loss(velocity_of(policy), rollout, 3, labels, advantages, clip_range=0.1)


def test_off_policy_ratio_moves_and_clips(teacher):
    noise, labels = _randn(6, 1, 16, 16, seed=15), torch.arange(6)
    rollout = sde_rollout(velocity_of(teacher), noise, labels, SIGMAS, eta=0.9,
                          generator=torch.Generator().manual_seed(2))
    perturbed = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1.01)
    out = policy_loss(velocity_of(perturbed), rollout, 1, labels, torch.ones(6), clip_range=1e-5)
    assert (out.ratio != 1).all() and out.clip_frac.sum() > 0


def test_subgrpo_steps_count_determinism_and_variation():
    picks = [subgrpo_steps(3, 2, epoch, seed=7) for epoch in range(20)]
    assert all(len(p) == 2 and p == sorted(p) and set(p) <= {0, 1, 2} for p in picks)
    assert picks == [subgrpo_steps(3, 2, epoch, seed=7) for epoch in range(20)]
    assert {tuple(p) for p in picks} == {(0, 1), (0, 2), (1, 2)}
    assert subgrpo_steps(3, 3, 5, seed=0) == [0, 1, 2]
    assert [subgrpo_steps(10, 4, e, seed=1) for e in range(5)] != [subgrpo_steps(10, 4, e, seed=2) for e in range(5)]
    with pytest.raises(ValueError, match=r"num_trained must be in \[1, num_stochastic=3\], got 4"):
        subgrpo_steps(3, 4, 0, seed=0)


def test_group_shared_noise_is_shared_within_groups_only():
    noise = group_shared_noise([0, 2], group_seeds=[11, 12, 13], group_size=4, sample_shape=(1, 16, 16), epoch=3)
    assert set(noise) == {0, 2} and noise[0].shape == (12, 1, 16, 16)
    for xi in noise.values():
        groups = xi.view(3, 4, -1)
        assert (groups == groups[:, :1]).all()                  # identical within each group
        assert not torch.equal(groups[0, 0], groups[1, 0])      # different between groups
    assert not torch.equal(noise[0], noise[2])                  # different steps
    again = group_shared_noise([0], [11, 12, 13], 4, (1, 16, 16), epoch=3)
    assert torch.equal(again[0], noise[0])                      # reproducible from (seed, step, epoch)
    other_epoch = group_shared_noise([0], [11, 12, 13], 4, (1, 16, 16), epoch=4)
    assert not torch.equal(other_epoch[0], noise[0])


def test_rollout_uses_shared_noise_at_untrained_steps(teacher):
    trained = subgrpo_steps(3, 2, epoch=0, seed=0)
    untrained = [s for s in range(3) if s not in trained]
    labels = torch.tensor([3, 3, 3, 7, 7, 7])
    shared = group_shared_noise(untrained, group_seeds=[3, 7], group_size=3, sample_shape=(1, 16, 16), epoch=0)
    rollout = sde_rollout(velocity_of(teacher), _randn(6, 1, 16, 16, seed=16), labels, SIGMAS, eta=0.9,
                          generator=torch.Generator().manual_seed(3), shared_noise=shared)
    for step in range(3):
        xi = (rollout.trajectory[step + 1] - rollout.means[step]) / rollout.stds[step].view(-1, 1, 1, 1)
        groups = xi.view(2, 3, -1)
        if step in untrained:
            torch.testing.assert_close(xi, shared[step], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(groups, groups[:, :1].expand_as(groups), atol=1e-5, rtol=1e-5)
        else:
            assert (groups[:, 1:] - groups[:, :1]).abs().amax() > 1.0


def test_argument_errors(teacher):
    x, labels = _randn(2, 1, 16, 16), torch.arange(2)
    v_fn = velocity_of(teacher)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\].*got 1.5"):
        cps_mean_std(x, x, 0.5, 0.25, 1.5)
    with pytest.raises(ValueError, match=r"stochastic_steps must lie in \[0, 2\].*got \[3\]"):
        sde_rollout(v_fn, x, labels, SIGMAS, eta=0.9, stochastic_steps=[3])
    with pytest.raises(ValueError, match=r"eta must be in \(0, 1\] when there are stochastic steps"):
        sde_rollout(v_fn, x, labels, SIGMAS, eta=0.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sde_rollout(v_fn, x, labels, [1.0, 0.5, 0.5], eta=0.9)
    with pytest.raises(ValueError, match=r"shared_noise is given for steps \[2\]"):
        sde_rollout(v_fn, x, labels, SIGMAS, eta=0.9, stochastic_steps=[0, 1], shared_noise={2: x})
    with pytest.raises(ValueError, match=r"a sigma must be a float or a \[B\] tensor with B=2"):
        cps_mean_std(x, x, torch.ones(3), 0.25, 0.5)


def test_samples_drawn_in_parts_with_their_rows_of_the_draws_are_the_whole_batchs():
    """Evaluation under torchrun draws a grid in shares (every world-size-th sample): with each share's
    rows of the grid's re-noise draws, the samples are those of one few_step_sample call."""
    from fastdmd.rollout import few_step_sample, renoise_draws, sample_with_draws

    sigmas = [0.999, 0.749, 0.499, 0.249]
    noise, labels = torch.randn(7, 1, 4, 4), torch.arange(7)
    x0_fn = lambda x, s, y: 0.5 * x.tanh() + 0.1 * y.view(-1, 1, 1, 1) * s.view(-1, 1, 1, 1)  # noqa: E731
    whole = few_step_sample(x0_fn, noise, labels, sigmas, torch.Generator().manual_seed(3))
    draws = renoise_draws(noise, len(sigmas) - 1, torch.Generator().manual_seed(3))
    for r in range(3):
        part = sample_with_draws(x0_fn, noise[r::3], labels[r::3], sigmas, [d[r::3] for d in draws])
        assert torch.equal(part, whole[r::3])
