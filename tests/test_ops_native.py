"""The native kernels (kernels/, built by CMakeLists.txt, loaded by fastdmd/ops/native.py) against
the references (fastdmd/ops/reference.py), with the Triton tests' tolerance rule
(fastdmd/ops/testing.py: no worse than PyTorch at the input precision).

Skipped when the library is not built; CTest (`ctest --test-dir build/native`) sets
FASTDMD_NATIVE_LIB to its build and FASTDMD_NATIVE_REQUIRED=1, which turns a library that cannot
be loaded into a failure instead. The tests run on CPU, and on CUDA too when a GPU is present and
the library was built with its CUDA kernels.
"""

import os

import pytest
import torch

from fastdmd import ops
from fastdmd.ops import native, reference
from fastdmd.ops.testing import assert_no_worse_than_torch

try:
    native.load()
except RuntimeError as error:
    if os.environ.get("FASTDMD_NATIVE_REQUIRED") == "1":
        raise
    pytest.skip(f"the native library is not built: {str(error).splitlines()[0]}",
                allow_module_level=True)

# The bad-argument tables of the Triton tests: the native wrappers must raise the same ValueErrors.
import test_ops_dmd_target as triton_dmd_target_tests  # noqa: E402
import test_ops_group_advantages as triton_group_advantages_tests  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in native.devices() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def as_fp64(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


# dmd_target ---------------------------------------------------------------------------------------

def make_inputs(shape, dtype=torch.float32, device="cpu", *, uncond=True, weights=False,
                noise=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def latent():
        return torch.randn(shape, generator=generator).to(device, dtype)

    def per_sample(low, high):
        return (low + (high - low) * torch.rand(shape[0], generator=generator)).to(device)

    return dict(
        x0=latent(), x_t=latent(), real_cond=latent(), real_uncond=latent() if uncond else None,
        fake=latent(), a=per_sample(0.5, 1.5), b=per_sample(-1.0, -0.1),
        guidance_scale=4.5 if uncond else 1.0, weights=per_sample(0.0, 2.0) if weights else None,
        noise=latent() if noise else None, c=per_sample(0.1, 0.5) if noise else None)


def assert_matches_reference(inputs, dtype):
    """Native vs the fp64 reference, with PyTorch at `dtype` as the error yardstick."""
    out = native.dmd_target(**inputs)
    exact = reference.dmd_target(**as_fp64(inputs))
    with reference.computed_in(dtype):
        lowprec = reference.dmd_target(**inputs)
    for name in reference.DMDTarget._fields:
        assert_no_worse_than_torch(name, getattr(out, name), getattr(exact, name),
                                   getattr(lowprec, name), dtype)
    assert out.target.dtype == inputs["x0"].dtype
    assert out.target.device == inputs["x0"].device
    return out


CASES = {
    "one_element_1d": dict(shape=(3,)),
    "one_element": dict(shape=(3, 1, 1, 1)),
    "odd_sizes": dict(shape=(2, 3, 5, 7)),
    "batch_one": dict(shape=(1, 4, 9, 9)),
    "video_5d": dict(shape=(2, 3, 2, 5, 7)),
    "no_cfg": dict(shape=(2, 3, 8, 8), uncond=False),
    "weights_and_noise": dict(shape=(3, 2, 11, 7), weights=True, noise=True),
    # 40000 elements per sample: chunks of 16384 (CPU) and 4096 (CUDA), the last ones partial.
    "several_chunks": dict(shape=(3, 40000), weights=True, noise=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case, dtype, device):
    case = dict(case)
    assert_matches_reference(make_inputs(case.pop("shape"), dtype, device, **case), dtype)


def test_mixed_input_dtypes(device):
    # The checks allow each input its own dtype; every one is read in its own precision.
    inputs = make_inputs((2, 3, 5, 7), torch.bfloat16, device, weights=True, noise=True)
    inputs["fake"] = inputs["fake"].float()
    inputs["real_cond"] = inputs["real_cond"].half()
    inputs["a"] = inputs["a"].double()
    assert_matches_reference(inputs, torch.bfloat16)


def test_zero_normalizer(device):
    # x0 parametrization (a=0, b=1) with real_cond = x0: x0_real == x0 exactly, p_real == 0.
    inputs = make_inputs((2, 3, 5), device=device, uncond=False)
    inputs.update(a=torch.zeros(2, device=device), b=torch.ones(2, device=device),
                  real_cond=inputs["x0"].clone())
    out = assert_matches_reference(inputs, torch.float32)
    assert torch.equal(out.normalizer, torch.full_like(out.normalizer, 1e-8))
    assert out.grad_sq.min() > 1e14  # grad = (fake - x0) / 1e-8

    # With eps=0 the normalizer is 0, grad = x/0 is non-finite everywhere, hence 0: target == x0.
    out = native.dmd_target(**inputs | dict(eps=0.0))
    assert torch.equal(out.target, inputs["x0"])
    assert torch.equal(out.normalizer, torch.zeros_like(out.normalizer))
    assert out.loss.item() == 0.0 and torch.equal(out.cosine, torch.zeros_like(out.cosine))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_inputs(dtype, device):
    inputs = make_inputs((3, 2, 4, 4), dtype, device, weights=True)
    inputs["fake"][0, 0, 0, 0] = float("nan")      # one grad element NaN -> 0
    inputs["real_cond"][0, 1, 2, 3] = float("inf")  # one p_real inf: normalizer inf -> grad 0
    inputs["x_t"][1, 1, 1, 1] = float("-inf")       # same in sample 1
    out = assert_matches_reference(inputs, dtype)
    assert torch.isfinite(out.target).all() and torch.isfinite(out.loss)
    assert torch.equal(out.target[:2], inputs["x0"][:2])  # samples with a non-finite normalizer
    assert torch.isinf(out.normalizer[:2]).all() and torch.isfinite(out.normalizer[2])
    assert torch.equal(out.grad_sq[:2], torch.zeros(2, device=device))

    # A non-finite generator output makes the loss NaN (inf - inf), as in the reference.
    inputs["x0"][2, 0, 0, 0] = float("inf")
    assert torch.isnan(assert_matches_reference(inputs, dtype).loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype, device):
    inputs = make_inputs((2, 6, 5, 9), dtype, device, noise=True)
    for name in ("x0", "real_cond", "real_uncond", "noise"):
        inputs[name] = inputs[name].transpose(1, 3)                # permuted views
    inputs["x_t"] = inputs["x_t"].transpose(1, 3).contiguous()
    inputs["fake"] = torch.randn(2, 9, 10, 6, device=device).to(dtype)[:, :, ::2]  # strided slice
    inputs["a"] = (torch.rand(2, 2, device=device) + 0.5)[:, 0]    # strided per-sample coefficient
    assert not inputs["x0"].is_contiguous() and not inputs["fake"].is_contiguous()
    assert not inputs["a"].is_contiguous()
    out = assert_matches_reference(inputs, dtype)
    assert out.target.shape == inputs["x0"].shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 300), (2, 40000)], ids=["one_chunk", "several_chunks"])
def test_gradients(dtype, shape, device):
    inputs = make_inputs(shape, dtype, device, weights=True, noise=True)

    def grads(fn, inputs):
        inputs = dict(inputs, x0=inputs["x0"].detach().requires_grad_(),
                      weights=inputs["weights"].detach().requires_grad_())
        # A loss scale other than 1 checks that the incoming gradient is used.
        (3.0 * fn(**inputs).loss).backward()
        return inputs["x0"].grad, inputs["weights"].grad

    out = grads(native.dmd_target, inputs)
    exact = grads(reference.dmd_target, as_fp64(inputs))
    with reference.computed_in(dtype):
        lowprec = grads(reference.dmd_target, inputs)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    for name, o, e, l in zip(["d x0", "d weights"], out, exact, lowprec):
        assert_no_worse_than_torch(name, o, e, l, dtype)


def test_no_residual_saved_without_grad(device):
    inputs = make_inputs((2, 40), device=device, weights=True)
    args = [inputs[k] for k in ("x0", "x_t", "real_cond", "real_uncond", "fake", "a", "b")]
    out = torch.ops.fastdmd_native.dmd_target(*args, 4.5, inputs["weights"], None, None, 1e-8,
                                              False)
    assert out[-1].numel() == 0
    assert native.dmd_target(**inputs).loss.grad_fn is None


def test_deterministic_batch_and_thread_invariant(device):
    # 30000 elements per sample: several chunks, and on CPU enough work for several threads.
    inputs = make_inputs((4, 3, 100, 100), torch.bfloat16, device, weights=True, noise=True)
    threads = torch.get_num_threads()
    try:
        first = native.dmd_target(**inputs)
        torch.set_num_threads(1)
        one_thread = native.dmd_target(**inputs)
    finally:
        torch.set_num_threads(threads)
    single = native.dmd_target(**{k: v[1:2] if isinstance(v, torch.Tensor) else v
                                  for k, v in inputs.items()})
    for name in first._fields:
        assert torch.equal(getattr(first, name), getattr(one_thread, name)), name
    for name in ("target", "normalizer", "grad_sq", "cosine"):
        assert torch.equal(getattr(single, name), getattr(first, name)[1:2]), name


def test_compiles_without_graph_break(device):
    inputs = make_inputs((2, 3, 7), device=device, weights=True, noise=True)

    def step(x0, inputs):
        out = native.dmd_target(**dict(inputs, x0=x0))
        return 2.0 * out.loss, out.target, out.cosine

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x0_eager, x0_compiled = (inputs["x0"].clone().requires_grad_() for _ in range(2))
    eager_out, compiled_out = step(x0_eager, inputs), compiled(x0_compiled, inputs)
    for e, c in zip(eager_out, compiled_out):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    eager_out[0].backward()
    compiled_out[0].backward()
    torch.testing.assert_close(x0_compiled.grad, x0_eager.grad, rtol=0, atol=0)


def test_opcheck(device):
    inputs = make_inputs((2, 3, 5), device=device, weights=True, noise=True)
    args = (inputs["x0"].requires_grad_(), inputs["x_t"], inputs["real_cond"],
            inputs["real_uncond"], inputs["fake"], inputs["a"], inputs["b"], 4.5, inputs["weights"],
            inputs["noise"], inputs["c"], 1e-8, True)
    torch.library.opcheck(torch.ops.fastdmd_native.dmd_target.default, args)


@pytest.mark.parametrize("change, message", triton_dmd_target_tests.BAD_INPUTS.values(),
                         ids=triton_dmd_target_tests.BAD_INPUTS.keys())
def test_dmd_target_bad_inputs_raise(change, message):
    inputs = triton_dmd_target_tests.make_inputs((2, 3, 4))
    with pytest.raises(ValueError, match=message):
        native.dmd_target(**inputs | change(inputs))


def test_dmd_target_rejects_float64():
    with pytest.raises(ValueError, match=r"x0 must have dtype bfloat16, float16, float32, got "
                                         r"torch.float64"):
        native.dmd_target(**as_fp64(make_inputs((2, 3))))


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" in DEVICES,
                    reason="needs a GPU and a library built without its CUDA kernels")
def test_cpu_only_library_rejects_cuda_tensors():
    with pytest.raises(ValueError, match=r"has no kernels for tensors on cuda.*FASTDMD_CUDA=ON"):
        native.dmd_target(**make_inputs((2, 3), device="cuda"))


# group_advantages ---------------------------------------------------------------------------------

def random_rewards(n, k, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, k, generator=generator) * torch.linspace(0.5, 3.0, k) + torch.arange(k)
    return rewards.to(device, dtype)


def assert_advantages_match_reference(dtype, **kwargs):
    out = native.group_advantages(**kwargs)
    exact = reference.group_advantages(**as_fp64(kwargs))
    with reference.computed_in(dtype):
        lowprec = reference.group_advantages(**kwargs)
    assert torch.equal(out.valid, exact.valid)
    for name in ("advantages", "group_mean", "group_std"):
        assert_no_worse_than_torch(name, getattr(out, name), getattr(exact, name),
                                   getattr(lowprec, name), dtype)
    return out


LAYOUTS = {
    "groups_of_8": dict(n=64, k=3, group_size=8),
    "groups_of_1": dict(n=5, k=2, group_size=1),
    "one_group_of_300": dict(n=300, k=1, group_size=300),
    "odd_group_size": dict(n=35, k=5, group_size=7),
    "ids": dict(n=50, k=3, ids=[0, 1, 2, 3, 4, 5]),
    "ids_int32_one_group": dict(n=9, k=2, ids=[4], ids_dtype=torch.int32),
    "ids_with_gaps_and_negatives": dict(n=40, k=2, ids=[-7, 0, 3, 1000]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_advantages_match_reference(layout, dtype, device):
    layout = dict(layout)
    rewards = random_rewards(layout.pop("n"), layout.pop("k"), dtype, device)
    if "ids" in layout:
        ids = torch.tensor(layout.pop("ids"))
        generator = torch.Generator().manual_seed(1)
        pick = torch.randint(0, len(ids), (rewards.shape[0],), generator=generator)
        layout["group_ids"] = ids[pick].to(device, layout.pop("ids_dtype", torch.int64))
    weights = torch.linspace(0.5, 1.5, rewards.shape[1], device=device)
    assert_advantages_match_reference(dtype, rewards=rewards, weights=weights, clip=1.5, **layout)


def test_zero_variance_groups(device):
    # Group 0: one reward constant (a valid group: that reward contributes z = 0). Group 1: every
    # reward constant: no signal, advantages 0, valid False. (eps = 0, which would make those z-scores
    # 0/0, is refused: test_bad_inputs in test_ops_group_advantages.py.)
    rewards = random_rewards(16, 2, torch.float32, device)
    rewards[:8, 1] = 0.5
    rewards[8:] = torch.tensor([2.0, -1.0], device=device)
    out = assert_advantages_match_reference(torch.float32, rewards=rewards, group_size=8, eps=1e-6, clip=None)
    assert out.valid.tolist() == [True] * 8 + [False] * 8
    assert torch.equal(out.advantages[8:], torch.zeros(8, device=device))
    alone = native.group_advantages(rewards[:8, :1], group_size=8, eps=1e-6, clip=None)
    torch.testing.assert_close(out.advantages[:8], alone.advantages, atol=1e-6, rtol=0)


def test_non_finite_rewards(device):
    # A NaN reward makes its group's advantages NaN, as in the reference; other groups unaffected.
    rewards = random_rewards(12, 2, torch.float32, device)
    rewards[1, 0] = float("nan")
    rewards[7, 1] = float("inf")
    out = assert_advantages_match_reference(torch.float32, rewards=rewards, group_size=4)
    assert out.advantages[:4].isnan().all() and torch.isfinite(out.advantages[8:]).all()


def test_non_contiguous_rewards(device):
    rewards = random_rewards(24, 4, torch.float32, device)[:, ::2]
    assert not rewards.is_contiguous()
    assert_advantages_match_reference(torch.float32, rewards=rewards, group_size=6,
                                      weights=torch.tensor([2.0, 1.0], device=device))


def test_rewards_are_constants(device):
    rewards = random_rewards(8, 2, torch.float32, device).requires_grad_()
    assert native.group_advantages(rewards, group_size=4).advantages.grad_fn is None


@pytest.mark.parametrize("by_ids", [False, True], ids=["group_size", "group_ids"])
def test_advantages_compile_without_graph_break(by_ids, device):
    rewards = random_rewards(24, 3, torch.float32, device)
    layout = dict(group_ids=torch.arange(24, device=device) % 5) if by_ids else dict(group_size=4)
    weights = torch.tensor([1.0, 0.5, 2.0], device=device)

    def fused(rewards):
        out = native.group_advantages(rewards, weights=weights, **layout)
        return out.advantages * 2, out.valid, out.group_std.sum(dim=0)

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for e, c in zip(fused(rewards), compiled(rewards)):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("by_ids", [False, True], ids=["group_size", "group_ids"])
def test_advantages_opcheck(by_ids, device):
    rewards = random_rewards(12, 2, torch.float32, device)
    ids = torch.arange(12, device=device) % 3 if by_ids else None
    args = (rewards, None if by_ids else 3, ids, torch.tensor([1.0, 2.0], device=device), 1e-6, 5.0)
    torch.library.opcheck(torch.ops.fastdmd_native.group_advantages.default, args)


@pytest.mark.parametrize("change, message", triton_group_advantages_tests.BAD_INPUTS.values(),
                         ids=triton_group_advantages_tests.BAD_INPUTS.keys())
def test_group_advantages_bad_inputs_raise(change, message):
    kwargs = dict(rewards=torch.ones(6, 2), group_size=2) | change
    with pytest.raises(ValueError, match=message):
        native.group_advantages(**kwargs)


# the ops.backend switch ---------------------------------------------------------------------------

def test_backend_native_dispatches_here(monkeypatch):
    called = []
    monkeypatch.setattr(native, "dmd_target", lambda *args: called.append("dmd_target"))
    monkeypatch.setattr(native, "group_advantages", lambda *args: called.append("group_advantages"))
    monkeypatch.setattr(ops, "backend", "native")
    ops.dmd_target(**make_inputs((2, 3)))
    ops.group_advantages(torch.ones(4, 1), group_size=2)
    assert called == ["dmd_target", "group_advantages"]


def test_backend_native_has_no_clipped_policy_loss(monkeypatch):
    monkeypatch.setattr(ops, "backend", "native")
    x = torch.randn(2, 3)
    message = r"clipped_policy_loss has no native implementation.*'triton', 'reference'"
    with pytest.raises(ValueError, match=message):
        ops.clipped_policy_loss(x, x, torch.ones(2), torch.zeros(2), torch.ones(2), 0.2)


def test_missing_library_error_gives_the_build_commands(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv(native.LIBRARY_ENV, str(tmp_path / "libfastdmd_native.so"))
    message = r"does not exist.*\n.*cmake -S \. -B build/native.*\n.*cmake --build build/native"
    with pytest.raises(RuntimeError, match=message):
        native.load()
