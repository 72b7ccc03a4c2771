"""Group advantages (fastdmd/ops/group_advantages_triton.py) against hand-computed values and the
reference (fastdmd/ops/reference.py).

On a machine without a GPU the kernel runs in the Triton interpreter on CPU; with a GPU the same
tests run the compiled kernel on CUDA, and the tests marked gpu run too.
"""

import math
import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import numpy as np
import pytest
import torch

from fastdmd import ops
from fastdmd.ops import reference
from fastdmd.ops.group_advantages_triton import group_advantages
from fastdmd.ops.testing import assert_no_worse_than_torch, default_device

DEVICE = default_device()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
IMPLS = pytest.mark.parametrize("impl", [reference.group_advantages, group_advantages],
                                ids=["reference", "triton"])


def tensor(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


@IMPLS
def test_hand_computed_two_rewards(impl):
    # Three groups of two samples, two rewards, weights (1, 2):
    #   group 0: r1 = (1, 3) -> z1 = (-1, 1); r2 constant -> z2 = 0; fused (-1, 1) -> (-1, 1)
    #   group 1: r1 constant; r2 = (0, 4) -> z2 = (-1, 1); fused (-2, 2) -> (-1, 1)
    #   group 2: both rewards constant: no signal, advantages 0, valid False
    rewards = tensor([[1, 10], [3, 10], [5, 0], [5, 4], [7, 3], [7, 3]])
    out = impl(rewards, group_size=2, weights=tensor([1.0, 2.0]), eps=1e-6, clip=5.0)
    torch.testing.assert_close(out.advantages, tensor([-1, 1, -1, 1, 0, 0]), atol=1e-5, rtol=0)
    assert out.valid.tolist() == [True, True, True, True, False, False]
    torch.testing.assert_close(out.group_mean, tensor([[2, 10], [5, 2], [7, 3]]))
    torch.testing.assert_close(out.group_std, tensor([[1, 0], [0, 2], [0, 0]]))

    clipped = impl(rewards, group_size=2, weights=tensor([1.0, 2.0]), clip=0.5)
    torch.testing.assert_close(clipped.advantages, tensor([-0.5, 0.5, -0.5, 0.5, 0, 0]))


@IMPLS
def test_hand_computed_uneven_group(impl):
    # (0, 0, 3): mean 1, population std sqrt(2) -> (-1, -1, 2) / sqrt(2); then a constant group.
    out = impl(tensor([[0], [0], [3], [1], [1], [1]]), group_size=3, eps=1e-6, clip=None)
    s = math.sqrt(2)
    torch.testing.assert_close(out.advantages, tensor([-1 / s, -1 / s, 2 / s, 0, 0, 0]), atol=1e-5, rtol=0)
    assert out.valid.tolist() == [True, True, True, False, False, False]
    torch.testing.assert_close(out.group_std, tensor([[s], [0]]))


@IMPLS
def test_group_ids_follow_sorted_distinct_ids(impl):
    # Ids 7, 3, 9 interleaved: group 0 is id 3, group 1 id 7, group 2 id 9 (torch.unique order);
    # advantages come back in the original row order.
    rewards = tensor([[1], [10], [3], [30], [5], [5]])
    ids = tensor([7, 3, 7, 3, 9, 9], torch.int64)
    out = impl(rewards, group_ids=ids)
    torch.testing.assert_close(out.group_mean, tensor([[20], [2], [5]]))
    torch.testing.assert_close(out.advantages, tensor([-1, -1, 1, 1, 0, 0]), atol=1e-5, rtol=0)
    assert out.valid.tolist() == [True, True, True, True, False, False]


def random_rewards(n, k, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, k, generator=generator) * torch.linspace(0.5, 3.0, k) + torch.arange(k)
    return rewards.to(DEVICE, dtype)


def assert_matches_reference(dtype, **kwargs):
    kernel = group_advantages(**kwargs)
    exact = reference.group_advantages(**{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                          else v for k, v in kwargs.items()})
    with reference.computed_in(dtype):
        lowprec = reference.group_advantages(**kwargs)
    assert torch.equal(kernel.valid, exact.valid)
    for name in ("advantages", "group_mean", "group_std"):
        assert_no_worse_than_torch(name, getattr(kernel, name), getattr(exact, name),
                                   getattr(lowprec, name), dtype)


LAYOUTS = {
    "groups_of_8": dict(n=64, k=3, group_size=8),
    "groups_of_1": dict(n=5, k=2, group_size=1),
    "one_group_of_300": dict(n=300, k=1, group_size=300),
    "odd_group_size": dict(n=35, k=5, group_size=7),
    "ids": dict(n=50, k=3, num_ids=6),
    "ids_int32_one_group": dict(n=9, k=2, num_ids=1, ids_dtype=torch.int32),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_matches_reference(layout, dtype):
    layout = dict(layout)
    rewards = random_rewards(layout.pop("n"), layout.pop("k"), dtype)
    if "num_ids" in layout:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, layout.pop("num_ids"), (rewards.shape[0],), generator=generator)
        layout["group_ids"] = ids.to(DEVICE, layout.pop("ids_dtype", torch.int64))
    weights = torch.linspace(0.5, 1.5, rewards.shape[1], device=DEVICE)
    assert_matches_reference(dtype, rewards=rewards, weights=weights, clip=1.5, **layout)


def test_zero_variance_reward_in_a_valid_group():
    # One constant reward does not invalidate a group: it contributes z = 0 to the fusion.
    rewards = random_rewards(16, 2, torch.float32)
    rewards[:8, 1] = 0.5
    out = group_advantages(rewards, group_size=8, clip=None)
    assert out.valid.all()
    alone = group_advantages(rewards[:8, :1], group_size=8, clip=None)
    torch.testing.assert_close(out.advantages[:8], alone.advantages, atol=1e-5, rtol=0)
    assert_matches_reference(torch.float32, rewards=rewards, group_size=8)


def test_non_contiguous_rewards():
    rewards = random_rewards(24, 4, torch.float32)[:, ::2]
    assert not rewards.is_contiguous()
    assert_matches_reference(torch.float32, rewards=rewards, group_size=6, weights=tensor([2.0, 1.0]))


@pytest.mark.parametrize("by_ids", [False, True], ids=["group_size", "group_ids"])
def test_compiles_without_graph_break(by_ids):
    rewards = random_rewards(24, 3, torch.float32)
    layout = dict(group_ids=torch.arange(24, device=DEVICE) % 5) if by_ids else dict(group_size=4)

    def fused(rewards):
        out = group_advantages(rewards, weights=tensor([1.0, 0.5, 2.0]), **layout)
        return out.advantages * 2, out.valid, out.group_std.sum(dim=0)

    # aot_eager on CPU: the interpreter's kernels cannot be inlined anyway, and it checks what
    # matters here (fake impl, autograd registration, no graph break). Default tolerances: on GPU
    # inductor may reorder the reductions around the op.
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    for e, c in zip(fused(rewards), torch.compile(fused, fullgraph=True, backend=backend)(rewards)):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("by_ids", [False, True], ids=["group_size", "group_ids"])
def test_opcheck(by_ids):
    rewards = random_rewards(12, 2, torch.float32)
    ids = torch.arange(12, device=DEVICE) % 3 if by_ids else None
    args = (rewards, None if by_ids else 3, ids, tensor([1.0, 2.0]), 1e-6, 5.0)
    torch.library.opcheck(torch.ops.fastdmd.group_advantages.default, args)


def test_rewards_are_constants():
    rewards = random_rewards(8, 2, torch.float32).requires_grad_()
    assert group_advantages(rewards, group_size=4).advantages.grad_fn is None


def test_importing_the_kernel_module_keeps_the_dispatcher():
    import fastdmd.ops.group_advantages_triton  # noqa: F401

    assert ops.group_advantages.__module__ == "fastdmd.ops"


@pytest.mark.parametrize("backend, expected", [("reference", "reference"), ("triton", "triton"),
                                               ("auto", "triton" if DEVICE.type == "cuda" else "reference")])
def test_dispatcher(monkeypatch, backend, expected):
    import fastdmd.ops.group_advantages_triton as kernel_module

    called = []
    monkeypatch.setattr(reference, "group_advantages", lambda *args: called.append("reference"))
    monkeypatch.setattr(kernel_module, "group_advantages", lambda *args: called.append("triton"))
    monkeypatch.setattr(ops, "backend", backend)
    ops.group_advantages(random_rewards(4, 1, torch.float32), group_size=2)
    assert called == [expected]


BAD_INPUTS = {
    "rewards 1d": (dict(rewards=torch.ones(6)), r"rewards must be a non-empty \[N, K\] tensor .*got shape \(6,\)"),
    "rewards integer": (dict(rewards=torch.ones(6, 2, dtype=torch.int64)), r"rewards must have dtype .*got torch.int64"),
    "no layout": (dict(group_size=None), r"give exactly one of group_size .* or group_ids"),
    "both layouts": (dict(group_ids=torch.zeros(6, dtype=torch.int64)), r"give exactly one of group_size"),
    "group size not dividing": (dict(group_size=4), r"N=6 must be a multiple of group_size=4"),
    "group size zero": (dict(group_size=0), r"group_size must be a positive int, got 0"),
    "group size float": (dict(group_size=2.0), r"group_size must be a positive int, got 2.0"),
    "group ids float": (dict(group_size=None, group_ids=torch.zeros(6)), r"group_ids must have dtype int32, int64"),
    "group ids length": (dict(group_size=None, group_ids=torch.zeros(5, dtype=torch.int64)), r"group_ids must have shape \(6,\), got \(5,\)"),
    "weights length": (dict(weights=torch.ones(3)), r"weights must have shape \(2,\), got \(3,\)"),
    "weights device": (dict(weights=torch.ones(2, device="meta")), r"weights is on meta but the other inputs are on"),
    "negative clip": (dict(clip=-1.0), r"clip must be > 0, got -1.0"),
    "zero clip": (dict(clip=0.0), r"clip must be > 0, got 0.0"),  # every advantage would be 0
    "zero eps": (dict(eps=0.0), r"eps must be > 0, got 0.0"),  # a reward constant in a group: 0 / 0
    "eps inf": (dict(eps=float("inf")), r"eps must be a finite number, got inf"),
}


@IMPLS
@pytest.mark.parametrize("change, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(impl, change, message):
    kwargs = dict(rewards=torch.ones(6, 2), group_size=2) | change
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
              for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        impl(**kwargs)


@IMPLS
def test_a_numpy_integer_group_size_is_a_group_size(impl):
    rewards = random_rewards(6, 2, torch.float32)
    torch.testing.assert_close(impl(rewards, group_size=np.int64(3)).advantages, impl(rewards, group_size=3).advantages)


def test_a_group_over_one_programs_tile_is_refused_before_launch():
    rows = (1 << 18) + 1  # next_pow2 2^19 rows x 4 (3 rewards, padded) = 2^21 elements
    rewards = torch.zeros(1, 3, device=DEVICE).expand(rows, 3)
    with pytest.raises(ValueError, match=r"a group of 262145 samples with 3 rewards needs a 524288 x 4 tile, over the "
                                         r"1048576 elements one Triton program holds; use smaller groups"):
        group_advantages(rewards, group_size=rows)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("by_ids", [False, True], ids=["group_size", "group_ids"])
def test_benchmark_shape_matches_reference(by_ids):
    rewards = random_rewards(1024, 4, torch.float32)
    layout = dict(group_ids=torch.randperm(1024, device=DEVICE) % 64) if by_ids else dict(group_size=16)
    assert_matches_reference(torch.float32, rewards=rewards, weights=tensor([1.0, 0.5, 0.25, 2.0]), **layout)
