"""DrPO's drift field (fastdmd/objectives/drift.py) on small point clouds whose answer is known."""

import math

import pytest
import torch

from fastdmd.objectives.drift import drift_field, drift_loss


def _cloud(center, n, seed, spread=0.3, dim=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(center, dtype=dtype) + spread * torch.randn((n, dim), generator=g, dtype=dtype)


@pytest.fixture
def clusters():
    """Positives around (+3, 0), negatives around (-3, 0), generated spread around the origin."""
    positives = _cloud([3.0, 0.0], 8, seed=0)
    negatives = _cloud([-3.0, 0.0], 8, seed=1)
    generated = _cloud([0.0, 0.0], 6, seed=2, spread=1.0)
    return generated, positives, negatives


def _oracle_field(x, pos, neg, w_pos, w_neg, radii):
    """METHODS.md's empirical form written out with loops, in fp64 (self-pairs: +100 distance)."""
    n, d = x.shape
    targets = list(x) + list(neg) + list(pos)
    weights = [1.0] * n + [w_neg] * len(neg) + [w_pos] * len(pos)
    dist = [[float((xi - y).norm()) for y in targets] for xi in x]
    scale = sum(w * dist[i][t] for i in range(n) for t, w in enumerate(weights)) / (n * sum(weights))
    scaled = [[dist[i][t] / scale + (100.0 if t == i else 0.0) for t in range(len(targets))] for i in range(n)]
    u = lambda y: y * math.sqrt(d) / scale  # noqa: E731
    total = torch.zeros(n, d, dtype=torch.float64)
    for r in radii:
        logit = [[-scaled[i][t] / r for t in range(len(targets))] for i in range(n)]
        row = [sum(math.exp(logit[i][t]) for t in range(len(targets))) for i in range(n)]
        col = [sum(math.exp(logit[i][t]) for i in range(n)) for t in range(len(targets))]
        field = torch.zeros(n, d, dtype=torch.float64)
        for i in range(n):
            a = [max(math.exp(logit[i][t]) / row[i] * math.exp(logit[i][t]) / col[t], 1e-6) ** 0.5 * weights[t]
                 for t in range(len(targets))]
            a_neg, a_pos = sum(a[:n + len(neg)]), sum(a[n + len(neg):])
            for t, y in enumerate(targets):
                coeff = a[t] * a_neg if t >= n + len(neg) else -a[t] * a_pos
                field[i] += coeff * (u(y) - u(x[i]))
        total += field / field.pow(2).mean().sqrt()
    return total


def test_matches_the_formula_written_out(clusters):
    x, pos, neg = clusters
    x, pos, neg = x[:4], pos[:3], neg[:2]
    expected = _oracle_field(x, pos, neg, 5.0, 2.0, (0.05, 0.2, 1.0))
    torch.testing.assert_close(drift_field(x, pos, neg, 5.0, 2.0, radii=(0.05, 0.2, 1.0)).field, expected)


def test_field_points_from_negatives_to_positives(clusters):
    x, pos, neg = clusters
    toward_pos = pos.mean(0) - x
    v = drift_field(x, pos, neg, w_pos=10.0, w_neg=10.0).field
    assert ((v * toward_pos).sum(1) > 0).all()
    # swap the roles: every sample now drifts the other way
    v_swapped = drift_field(x, neg, pos, w_pos=10.0, w_neg=10.0).field
    assert ((v_swapped * toward_pos).sum(1) < 0).all()


def test_zero_field_when_positives_and_negatives_coincide(clusters):
    x, pos, _ = clusters
    assert drift_field(x, pos, pos.clone(), 10.0, 10.0, generated_weight=0.0).field.abs().max() < 1e-9
    # with the generated block (weight 1, the default) the samples themselves act as negatives:
    # the field is the base drifting term toward the anchors, not zero
    v = drift_field(x, pos, pos.clone(), 10.0, 10.0).field
    assert ((v * (pos.mean(0) - x)).sum(1) > 0).all()


def test_permutation_equivariance(clusters):
    x, pos, neg = clusters
    v = drift_field(x, pos, neg, 10.0, 10.0).field
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(drift_field(x[perm], pos, neg, 10.0, 10.0).field, v[perm])
    # the order inside the anchor sets does not matter either
    torch.testing.assert_close(drift_field(x, pos.flip(0), neg.roll(3, 0), 10.0, 10.0).field, v)


def test_invariant_to_translation_and_scale_of_the_features(clusters):
    x, pos, neg = clusters
    ref = drift_field(x, pos, neg, 10.0, 10.0)
    shift, c = torch.tensor([5.0, -2.0], dtype=x.dtype), 7.0
    moved = drift_field(c * x + shift, c * pos + shift, c * neg + shift, 10.0, 10.0)
    torch.testing.assert_close(moved.field, ref.field)  # V lives in coordinates normalized by the scale
    torch.testing.assert_close(moved.scale, c * ref.scale)


def test_each_radius_field_has_unit_rms(clusters):
    x, pos, neg = clusters
    for radius in (0.02, 0.05, 0.2):
        v = drift_field(x, pos, neg, 10.0, 10.0, radii=(radius,)).field
        torch.testing.assert_close(v.pow(2).mean().sqrt(), torch.tensor(1.0, dtype=v.dtype))
    summed = drift_field(x, pos, neg, 10.0, 10.0).field
    parts = [drift_field(x, pos, neg, 10.0, 10.0, radii=(r,)).field for r in (0.02, 0.05, 0.2)]
    torch.testing.assert_close(summed, sum(parts))


def test_loss_value_and_gradient(clusters):
    x, pos, neg = clusters
    x = x.float().requires_grad_(True)
    out = drift_loss(x, pos.float(), neg.float(), 10.0, 10.0)
    v, scale = out.field.field, out.field.scale
    n, d = x.shape
    # u(x) - sg(u(x) + V) = -V, so the loss is mean(V^2) and d loss / d x = -2 V sqrt(D) / (N D scale)
    torch.testing.assert_close(out.loss, v.pow(2).mean())
    out.loss.backward()
    torch.testing.assert_close(x.grad, -2 * v * math.sqrt(d) / (n * d * scale))
    # a small gradient step moves every sample along its drift
    assert ((-x.grad * v).sum(1) > 0).all()


def test_reference_drift_with_self_masked_negatives():
    # L_ref: positives = the base generator's outputs, negatives = the samples themselves.
    x = _cloud([0.0, 0.0, 0.0, 0.0], 8, seed=3, spread=1.0, dim=4)
    offset = torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=x.dtype)
    v = drift_field(x, x + offset, x, 1.0, 1.0, mask_negative_self=True).field
    # every sample moves forward along the offset; besides, the samples (their own negatives)
    # spread apart, so only the batch-mean drift is aligned with the offset
    assert ((v @ offset) > 0).all()
    assert torch.nn.functional.cosine_similarity(v.mean(0), offset, dim=0) > 0.99


def test_a_sample_is_not_its_own_target(clusters):
    x, pos, neg = clusters
    # a lone sample: the generated block holds only its own (masked) copy, so its weight is moot
    alone = drift_field(x[:1], pos, neg, 10.0, 10.0).field
    torch.testing.assert_close(alone, drift_field(x[:1], pos, neg, 10.0, 10.0, generated_weight=0.0).field,
                               atol=1e-3, rtol=0)
    # negatives = the samples themselves, masked: sample 0 sees only sample 1 as a negative
    pair = x[:2]
    masked = drift_field(pair, pos, pair, 10.0, 10.0, mask_negative_self=True).field[0]
    others = drift_field(pair, pos, pair[1:], 10.0, 10.0).field[0]
    unmasked = drift_field(pair, pos, pair, 10.0, 10.0).field[0]
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(masked, others, dim=0) > 0.9999
    assert cosine(unmasked, others, dim=0) < 0.99  # the mask matters


def test_single_sample_and_per_anchor_weights(clusters):
    x, pos, neg = clusters
    one = drift_field(x[:1], pos, neg, 10.0, 10.0).field
    assert torch.isfinite(one).all() and one.abs().sum() > 0
    scalar = drift_field(x, pos, neg, 10.0, 3.0).field
    tensor = drift_field(x, pos, neg, torch.full((8,), 10.0), torch.full((8,), 3.0, dtype=torch.float64)).field
    torch.testing.assert_close(tensor, scalar)


def test_low_precision_features_are_computed_in_fp32(clusters):
    x, pos, neg = clusters
    out = drift_field(x.bfloat16(), pos.bfloat16(), neg.bfloat16(), 10.0, 10.0)
    assert out.field.dtype == torch.float32 and torch.isfinite(out.field).all()


def test_argument_errors(clusters):
    x, pos, neg = clusters
    with pytest.raises(ValueError, match=r"x must be a non-empty \[N, D\] tensor.*got shape \(6, 2, 1\)"):
        drift_field(x[..., None], pos, neg, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"positives must be a non-empty \[M, D\] tensor with D=2.*\(8, 3\)"):
        drift_field(x, torch.zeros(8, 3, dtype=x.dtype), neg, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"every radius must be > 0, got 0.0"):
        drift_field(x, pos, neg, 1.0, 1.0, radii=(0.05, 0.0))
    with pytest.raises(ValueError, match="w_neg must be >= 0, got -1.0"):
        drift_field(x, pos, neg, 1.0, -1.0)
    with pytest.raises(ValueError, match="negatives must have N=6 rows, got 8"):
        drift_field(x, pos, neg, 1.0, 1.0, mask_negative_self=True)
    with pytest.raises(ValueError, match=r"w_pos must have shape \(8,\), got \(3,\)"):
        drift_field(x, pos, neg, torch.ones(3), 1.0)
