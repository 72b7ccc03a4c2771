"""The clipped policy loss (fastdmd/ops/clipped_policy_loss_triton.py) against its reference
(fastdmd/ops/reference.py) and torch.distributions.

On a machine without a GPU the kernels run in the Triton interpreter on CPU; with a GPU the same
tests run the compiled kernels on CUDA, and the tests marked gpu run too.
"""

import contextlib
import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest
import torch

from fastdmd import ops
from fastdmd.ops import reference
from fastdmd.ops.clipped_policy_loss_triton import clipped_policy_loss
from fastdmd.ops.testing import assert_no_worse_than_torch, default_device, small_chunks

DEVICE = default_device()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CLIP_RANGE = 0.1


def make_inputs(shape, dtype=torch.float32, seed=0):
    """A sampler step: x_prev drawn from N(mean, std^2); old log-probs a little off-policy, so
    ratios spread around 1 and some samples are clipped."""
    generator = torch.Generator().manual_seed(seed)
    batch = shape[0]
    std = 0.05 + 0.45 * torch.rand(batch, generator=generator)
    mean = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    x_prev = mean + std.reshape(-1, *[1] * (len(shape) - 1)) * noise
    inputs = dict(x_prev=x_prev.to(DEVICE, dtype), mean=mean.to(DEVICE, dtype), std=std.to(DEVICE),
                  old_log_prob=torch.zeros(batch, device=DEVICE),
                  advantages=torch.randn(batch, generator=generator).to(DEVICE), clip_range=CLIP_RANGE)
    on_policy = reference.clipped_policy_loss(**inputs).log_prob
    inputs["old_log_prob"] = on_policy + 0.15 * torch.randn(batch, generator=generator).to(DEVICE)
    return inputs


def as_fp64(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def assert_matches_reference(inputs, dtype):
    """Flash-attention rule against PyTorch at the input precision, and, because this op promises
    fp32 whatever the inputs, against PyTorch in fp32 on the same inputs too."""
    kernel = clipped_policy_loss(**inputs)
    exact = reference.clipped_policy_loss(**as_fp64(inputs))
    for yardstick_dtype in {dtype, torch.float32}:
        with reference.computed_in(yardstick_dtype):
            lowprec = reference.clipped_policy_loss(**inputs)
        for name in ("loss", "log_prob", "ratio"):
            assert_no_worse_than_torch(name, getattr(kernel, name), getattr(exact, name),
                                       getattr(lowprec, name), yardstick_dtype)
    assert torch.equal(kernel.clip_frac, exact.clip_frac)
    return kernel


CASES = {
    "one_element_1d": (3,),
    "one_element": (3, 1, 1, 1),
    "odd_sizes": (2, 3, 5, 7),
    "several_blocks": (2, 4, 37, 37),
    "batch_one": (1, 4, 9, 9),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
def test_matches_reference(shape, dtype):
    out = assert_matches_reference(make_inputs(shape, dtype), dtype)
    assert out.log_prob.dtype == out.ratio.dtype == out.loss.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_block_chunks(dtype):
    with small_chunks(block=32, max_chunks=4):
        out = assert_matches_reference(make_inputs((5, 300), dtype), dtype)
    assert 0 < out.clip_frac.sum() < 5  # the data exercises both clipped and unclipped samples


def test_non_contiguous_inputs():
    inputs = make_inputs((3, 6, 10))
    inputs["x_prev"] = inputs["x_prev"].transpose(1, 2)
    inputs["mean"] = inputs["mean"].transpose(1, 2)
    inputs["advantages"] = torch.randn(3, 2, device=DEVICE)[:, 0]
    assert_matches_reference(inputs, torch.float32)


def test_log_prob_is_the_element_mean_of_the_normal_log_density():
    inputs = make_inputs((3, 4, 5, 6))
    per_element = torch.distributions.Normal(inputs["mean"].double(),
                                             inputs["std"].double().reshape(3, 1, 1, 1))
    expected = per_element.log_prob(inputs["x_prev"].double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(clipped_policy_loss(**inputs).log_prob.double(), expected,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_on_policy_ratio_is_exactly_one_in_any_batch(dtype):
    # The rollout records log-probs for the whole batch; training recomputes them in other batch
    # splits. Same inputs must give the same bits, so ratio == 1 and nothing is clipped.
    inputs = make_inputs((4, 300), dtype)
    with small_chunks(block=32, max_chunks=4):
        inputs["old_log_prob"] = clipped_policy_loss(**inputs).log_prob
        for part in (slice(0, 4), slice(1, 2), slice(2, 4)):
            sub = {k: v[part] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            out = clipped_policy_loss(**sub | dict(clip_range=1e-5))
            assert torch.equal(out.ratio, torch.ones_like(out.ratio)), part
            assert torch.equal(out.clip_frac, torch.zeros_like(out.clip_frac))
            assert torch.equal(out.loss, -sub["advantages"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "small_chunks"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_gradients(dtype, chunked, on_policy):
    inputs = make_inputs((4, 300), dtype)
    if on_policy:
        inputs["old_log_prob"] = clipped_policy_loss(**inputs).log_prob.detach()
    sample_weights = torch.tensor([1.0, -2.0, 0.5, 3.0], device=DEVICE)

    def grads(fn, inputs):
        inputs = dict(inputs, mean=inputs["mean"].detach().requires_grad_(),
                      std=inputs["std"].detach().requires_grad_())
        out = fn(**inputs)
        # Gradients reach log_prob from all three differentiable outputs: a per-sample one for the
        # loss, expanded (stride 0) ones from the sums over log_prob and ratio.
        objective = (out.loss * sample_weights).mean() + 0.1 * out.log_prob.sum() + 0.01 * out.ratio.sum()
        objective.backward()
        return inputs["mean"].grad, inputs["std"].grad

    with small_chunks() if chunked else contextlib.nullcontext():
        kernel = grads(clipped_policy_loss, inputs)
    exact = grads(reference.clipped_policy_loss, as_fp64(inputs))
    with reference.computed_in(torch.float32):
        fp32 = grads(reference.clipped_policy_loss, inputs)
    assert kernel[0].dtype == dtype
    assert_no_worse_than_torch("d mean", kernel[0], exact[0], fp32[0], dtype)
    assert_no_worse_than_torch("d std", kernel[1], exact[1], fp32[1], torch.float32)


def test_std_without_grad_gets_none():
    inputs = make_inputs((2, 7))
    inputs["mean"].requires_grad_()
    clipped_policy_loss(**inputs).loss.sum().backward()
    assert inputs["mean"].grad is not None and inputs["std"].grad is None


def test_compiles_without_graph_break():
    inputs = make_inputs((3, 4, 5))

    def step(mean, std, inputs):
        out = clipped_policy_loss(**dict(inputs, mean=mean, std=std))
        return out.loss.mean(), out.ratio, out.clip_frac

    # aot_eager on CPU: the interpreter's kernels cannot be inlined anyway, and it checks what
    # matters here (fake impl, autograd registration, no graph break). Default tolerances: on GPU
    # inductor may reorder the reductions around the op.
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    leaves = [(inputs["mean"].clone().requires_grad_(), inputs["std"].clone().requires_grad_())
              for _ in range(2)]
    eager_out, compiled_out = step(*leaves[0], inputs), compiled(*leaves[1], inputs)
    for e, c in zip(eager_out, compiled_out):
        torch.testing.assert_close(c, e)
    eager_out[0].backward()
    compiled_out[0].backward()
    for e, c in zip(*leaves):
        torch.testing.assert_close(c.grad, e.grad)


def test_opcheck():
    inputs = make_inputs((2, 3, 5))
    args = (inputs["x_prev"], inputs["mean"].requires_grad_(), inputs["std"].requires_grad_(),
            inputs["old_log_prob"], inputs["advantages"], CLIP_RANGE)
    torch.library.opcheck(torch.ops.fastdmd.clipped_policy_loss.default, args)


def test_importing_the_kernel_module_keeps_the_dispatcher():
    import fastdmd.ops.clipped_policy_loss_triton  # noqa: F401

    assert ops.clipped_policy_loss.__module__ == "fastdmd.ops"


@pytest.mark.parametrize("backend, expected", [("reference", "reference"), ("triton", "triton"),
                                               ("auto", "triton" if DEVICE.type == "cuda" else "reference")])
def test_dispatcher(monkeypatch, backend, expected):
    import fastdmd.ops.clipped_policy_loss_triton as kernel_module

    inputs, called = make_inputs((2, 3)), []
    monkeypatch.setattr(reference, "clipped_policy_loss", lambda *args: called.append("reference"))
    monkeypatch.setattr(kernel_module, "clipped_policy_loss", lambda *args: called.append("triton"))
    monkeypatch.setattr(ops, "backend", backend)
    ops.clipped_policy_loss(**inputs)
    assert called == [expected]


BAD_INPUTS = {
    "x_prev not a tensor": (lambda i: dict(x_prev=1.0), r"x_prev must be a torch.Tensor, got float"),
    "x_prev empty": (lambda i: dict(x_prev=i["x_prev"][:0]), r"x_prev must be a non-empty \[B, \.\.\.\] tensor"),
    "mean shape": (lambda i: dict(mean=i["mean"][:, :3]), r"mean must have shape \(2, 5\), got \(2, 3\)"),
    "mean integer": (lambda i: dict(mean=i["mean"].int()), r"mean must have dtype .*got torch.int32"),
    "mean device": (lambda i: dict(mean=i["mean"].to("meta")), r"mean is on meta but the other inputs are on"),
    "std per element": (lambda i: dict(std=i["std"][:, None].expand(2, 5)), r"std must be a \[B\] tensor with B=2 .*got shape \(2, 5\)"),
    "old log prob size": (lambda i: dict(old_log_prob=i["old_log_prob"][:1]), r"old_log_prob must be a \[B\] tensor with B=2"),
    "advantages integer": (lambda i: dict(advantages=torch.ones(2, dtype=torch.int64, device=DEVICE)), r"advantages must have dtype"),
    "negative clip": (lambda i: dict(clip_range=-0.2), r"clip_range must be >= 0, got -0.2"),
    "clip not a number": (lambda i: dict(clip_range="0.2"), r"clip_range must be a finite number, got '0.2'"),
}


@pytest.mark.parametrize("impl", [reference.clipped_policy_loss, clipped_policy_loss],
                         ids=["reference", "triton"])
@pytest.mark.parametrize("change, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(impl, change, message):
    inputs = make_inputs((2, 5))
    with pytest.raises(ValueError, match=message):
        impl(**inputs | change(inputs))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", [(8, 16, 128, 128), (2, 336, 60, 104)], ids=["image", "video"])
def test_full_size_latents_bf16(shape):
    inputs = make_inputs(shape, torch.bfloat16)
    assert_matches_reference(inputs, torch.bfloat16)
    inputs["old_log_prob"] = clipped_policy_loss(**inputs).log_prob
    single = clipped_policy_loss(**{k: v[-1:] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    assert torch.equal(single.ratio, torch.ones_like(single.ratio))
