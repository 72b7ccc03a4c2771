"""The fused DMD target (fastdmd/ops/dmd_target.py) against its reference (fastdmd/ops/reference.py).

On a machine without a GPU the kernels run in the Triton interpreter on CPU; with a GPU the same
tests run the compiled kernels on CUDA, and the tests marked gpu run too.
"""

import contextlib
import math
import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest
import torch

from fastdmd import ops
from fastdmd.ops import dmd_target_triton, reference
from fastdmd.ops import sample_chunks as sample_chunks_module
from fastdmd.ops.dmd_target_triton import dmd_target
from fastdmd.ops.testing import assert_no_worse_than_torch, default_device, small_chunks

DEVICE = default_device()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(shape, dtype=torch.float32, *, uncond=True, weights=False, noise=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def latent():
        return torch.randn(shape, generator=generator).to(DEVICE, dtype)

    def per_sample(low, high):
        return (low + (high - low) * torch.rand(shape[0], generator=generator)).to(DEVICE)

    return dict(
        x0=latent(), x_t=latent(), real_cond=latent(), real_uncond=latent() if uncond else None,
        fake=latent(), a=per_sample(0.5, 1.5), b=per_sample(-1.0, -0.1),
        guidance_scale=4.5 if uncond else 1.0, weights=per_sample(0.0, 2.0) if weights else None,
        noise=latent() if noise else None, c=per_sample(0.1, 0.5) if noise else None)


def as_fp64(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def assert_matches_reference(inputs, dtype):
    """Kernel vs the fp64 reference, with PyTorch at the input precision as the error yardstick."""
    kernel = dmd_target(**inputs)
    exact = reference.dmd_target(**as_fp64(inputs))
    with reference.computed_in(dtype):
        lowprec = reference.dmd_target(**inputs)
    for name in reference.DMDTarget._fields:
        assert_no_worse_than_torch(name, getattr(kernel, name), getattr(exact, name),
                                   getattr(lowprec, name), dtype)
    assert kernel.target.dtype == inputs["x0"].dtype
    return kernel


CASES = {
    "one_element_1d": dict(shape=(3,)),
    "one_element": dict(shape=(3, 1, 1, 1)),
    "odd_sizes": dict(shape=(2, 3, 5, 7)),
    "several_blocks": dict(shape=(2, 4, 37, 37)),
    "batch_one": dict(shape=(1, 4, 9, 9)),
    "video_5d": dict(shape=(2, 3, 2, 5, 7)),
    "no_cfg": dict(shape=(2, 3, 8, 8), uncond=False),
    "weights_and_noise": dict(shape=(3, 2, 11, 7), weights=True, noise=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case, dtype):
    case = dict(case)
    assert_matches_reference(make_inputs(case.pop("shape"), dtype, **case), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_block_chunks(dtype):
    # 300 elements in blocks of 32 = 10 blocks, cut into 4 chunks of 3 blocks (the last one partly
    # empty): the loops inside a program and the partial sums across programs.
    with small_chunks(block=32, max_chunks=4):
        assert_matches_reference(make_inputs((3, 300), dtype, weights=True, noise=True), dtype)


def test_forward_chunks_read_one_fp32_blocks_bytes_without_grad_and_one_block_with_it():
    """The forward's cut of a sample: without the residual saved, chunks of two bf16 / fp16 blocks, one fp32
    block; with it (a training step's forward), one block; MAX_CHUNKS at most, whatever the batch; the
    backward's: one block per chunk (an elementwise pass: more programs)."""
    image, video = 16 * 128 * 128, 336 * 60 * 104  # 128 and 1024 blocks of 2048

    def cut(numel, element_size, save_residual=False):
        chunks = dmd_target_triton.forward_chunks(numel, element_size, save_residual)
        return chunks.num_chunks, chunks.blocks_per_chunk

    assert cut(image, 2) == (64, 2) and cut(image, 2, save_residual=True) == (128, 1)
    assert cut(image, 4) == cut(image, 4, save_residual=True) == (128, 1)
    assert cut(video, 2) == cut(video, 2, save_residual=True) == (256, 4)  # MAX_CHUNKS decides
    assert cut(3, 2)[0] == 1 and cut(3 * 2048, 2)[0] == 2  # the last chunk partly empty
    assert sample_chunks_module.sample_chunks(image).num_chunks == 128


@pytest.mark.filterwarnings("ignore:.* encountered in divide:RuntimeWarning")  # interpreter's numpy
def test_zero_normalizer():
    # x0 parametrization (a=0, b=1) with real_cond = x0: x0_real == x0 exactly, p_real == 0.
    inputs = make_inputs((2, 3, 5), uncond=False)
    inputs.update(a=torch.zeros(2, device=DEVICE), b=torch.ones(2, device=DEVICE),
                  real_cond=inputs["x0"].clone())
    out = assert_matches_reference(inputs, torch.float32)
    assert torch.equal(out.normalizer, torch.full_like(out.normalizer, 1e-8))
    assert out.grad_sq.min() > 1e14  # grad = (fake - x0) / 1e-8

    # With eps=0 the normalizer is 0, grad = x/0 is non-finite everywhere, hence 0: target == x0.
    out = dmd_target(**inputs | dict(eps=0.0))
    assert torch.equal(out.target, inputs["x0"])
    assert torch.equal(out.normalizer, torch.zeros_like(out.normalizer))
    assert out.loss.item() == 0.0 and torch.equal(out.cosine, torch.zeros_like(out.cosine))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter's numpy
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_inputs(dtype):
    inputs = make_inputs((3, 2, 4, 4), dtype, weights=True)
    inputs["fake"][0, 0, 0, 0] = float("nan")      # one grad element NaN -> 0
    inputs["real_cond"][0, 1, 2, 3] = float("inf")  # one p_real element inf: normalizer inf -> grad 0
    inputs["x_t"][1, 1, 1, 1] = float("-inf")       # same in sample 1
    out = assert_matches_reference(inputs, dtype)
    assert torch.isfinite(out.target).all() and torch.isfinite(out.loss)
    assert torch.equal(out.target[:2], inputs["x0"][:2])  # samples with a non-finite normalizer
    assert torch.isinf(out.normalizer[:2]).all() and torch.isfinite(out.normalizer[2])
    assert torch.equal(out.grad_sq[:2], torch.zeros(2, device=DEVICE))

    # A non-finite generator output makes the loss NaN (inf - inf), as in the reference.
    inputs["x0"][2, 0, 0, 0] = float("inf")
    out = assert_matches_reference(inputs, dtype)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype):
    inputs = make_inputs((2, 6, 5, 9), dtype, noise=True)
    inputs["x0"] = inputs["x0"].transpose(1, 3)                     # permuted view
    inputs["x_t"] = inputs["x_t"].transpose(1, 3).contiguous()
    inputs["fake"] = torch.randn(2, 9, 10, 6, device=DEVICE).to(dtype)[:, :, ::2]  # strided slice
    inputs["real_cond"] = inputs["real_cond"].transpose(1, 3)
    inputs["real_uncond"] = inputs["real_uncond"].transpose(1, 3)
    inputs["noise"] = inputs["noise"].transpose(1, 3)
    assert not inputs["x0"].is_contiguous() and not inputs["fake"].is_contiguous()
    assert_matches_reference(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "small_chunks"])
def test_gradients(dtype, chunked):
    inputs = make_inputs((3, 300), dtype, weights=True, noise=True)

    def grads(fn, inputs):
        inputs = dict(inputs, x0=inputs["x0"].detach().requires_grad_(),
                      weights=inputs["weights"].detach().requires_grad_())
        # A loss scale other than 1 checks that the incoming gradient is used.
        (3.0 * fn(**inputs).loss).backward()
        return inputs["x0"].grad, inputs["weights"].grad

    with small_chunks() if chunked else contextlib.nullcontext():
        kernel = grads(dmd_target, inputs)
    exact = grads(reference.dmd_target, as_fp64(inputs))
    with reference.computed_in(dtype):
        lowprec = grads(reference.dmd_target, inputs)
    assert kernel[0].dtype == dtype
    for name, k, e, l in zip(["d x0", "d weights"], kernel, exact, lowprec):
        assert_no_worse_than_torch(name, k, e, l, dtype)


@pytest.mark.parametrize("name", ["fake", "real_cond", "x_t", "a", "noise"])
def test_inputs_without_a_gradient_give_a_loss_without_one(name):
    """Only x0 and the weights get gradients; an input that merely requires grad (a score network's output
    not detached) leaves the loss a constant, as in the reference, so a backward fails loudly."""
    inputs = make_inputs((2, 40), weights=True, noise=True)
    inputs[name] = inputs[name].detach().requires_grad_()
    for impl in (dmd_target, reference.dmd_target):
        assert not impl(**inputs).loss.requires_grad, impl


def test_no_residual_saved_without_grad():
    inputs = make_inputs((2, 40), weights=True)
    args = [inputs[k] for k in ("x0", "x_t", "real_cond", "real_uncond", "fake", "a", "b")]
    out = torch.ops.fastdmd.dmd_target(*args, 4.5, inputs["weights"], None, None, 1e-8, False)
    assert out[-1].numel() == 0
    assert dmd_target(**inputs).loss.grad_fn is None


def test_compiles_without_graph_break():
    inputs = make_inputs((2, 3, 7), weights=True, noise=True)

    def step(x0, inputs):
        out = dmd_target(**dict(inputs, x0=x0))
        return 2.0 * out.loss, out.target, out.cosine

    # aot_eager on CPU: the interpreter's kernels cannot be inlined anyway, and it checks what
    # matters here (fake impl, autograd registration, no graph break). Default tolerances: on GPU
    # inductor may reorder the reductions around the op.
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x0_eager, x0_compiled = (inputs["x0"].clone().requires_grad_() for _ in range(2))
    eager_out, compiled_out = step(x0_eager, inputs), compiled(x0_compiled, inputs)
    for e, c in zip(eager_out, compiled_out):
        torch.testing.assert_close(c, e)
    eager_out[0].backward()
    compiled_out[0].backward()
    torch.testing.assert_close(x0_compiled.grad, x0_eager.grad)


def test_opcheck():
    inputs = make_inputs((2, 3, 5), weights=True, noise=True)
    args = (inputs["x0"].requires_grad_(), inputs["x_t"], inputs["real_cond"], inputs["real_uncond"],
            inputs["fake"], inputs["a"], inputs["b"], 4.5, inputs["weights"], inputs["noise"],
            inputs["c"], 1e-8, True)
    torch.library.opcheck(torch.ops.fastdmd.dmd_target.default, args)


@pytest.mark.parametrize("backend, expected", [("reference", "reference"), ("triton", "triton"),
                                               ("auto", "triton" if DEVICE.type == "cuda" else "reference")])
def test_dispatcher(monkeypatch, backend, expected):
    import fastdmd.ops.dmd_target_triton as kernel_module

    called = []
    monkeypatch.setattr(reference, "dmd_target", lambda *args: called.append("reference"))
    monkeypatch.setattr(kernel_module, "dmd_target", lambda *args: called.append("triton"))
    monkeypatch.setattr(ops, "backend", backend)
    ops.dmd_target(**make_inputs((2, 3)))
    assert called == [expected]


def test_importing_the_kernel_module_keeps_the_dispatcher():
    import fastdmd.ops.dmd_target_triton  # noqa: F401

    assert ops.dmd_target.__module__ == "fastdmd.ops"


def test_dispatcher_rejects_unknown_backend(monkeypatch):
    monkeypatch.setattr(ops, "backend", "cuda")
    with pytest.raises(ValueError, match=r"ops.backend must be one of .*got 'cuda'"):
        ops.dmd_target(**make_inputs((2, 3)))


BAD_INPUTS = {
    "x0 not a tensor": (lambda i: dict(x0=i["x0"].tolist()), r"x0 must be a torch.Tensor, got list"),
    "x0 empty": (lambda i: dict(x0=i["x0"][:0]), r"x0 must be a non-empty \[B, \.\.\.\] tensor"),
    "x_t shape": (lambda i: dict(x_t=i["x_t"][:, :2]), r"x_t must have shape \(2, 3, 4\), got \(2, 2, 4\)"),
    "fake integer": (lambda i: dict(fake=i["fake"].long()), r"fake must have dtype bfloat16, float16, float32.*got torch.int64"),
    "real_uncond device": (lambda i: dict(real_uncond=i["real_uncond"].to("meta")), r"real_uncond is on meta but the other inputs are on"),
    "a size": (lambda i: dict(a=torch.ones(3, device=DEVICE)), r"a must be a \[B\] tensor with B=2 .*got shape \(3,\)"),
    "b per element": (lambda i: dict(b=torch.ones(2, 1, 1, device=DEVICE)), r"b must be a \[B\] tensor with B=2"),
    "weights integer": (lambda i: dict(weights=torch.ones(2, dtype=torch.int64, device=DEVICE)), r"weights must have dtype"),
    "guidance without uncond": (lambda i: dict(real_uncond=None), r"real_uncond is required when guidance_scale != 1.*got guidance_scale=4.5"),
    "guidance nan": (lambda i: dict(guidance_scale=float("nan")), r"guidance_scale must be a finite number, got nan"),
    "negative eps": (lambda i: dict(eps=-1.0), r"eps must be >= 0, got -1.0"),
    "noise without c": (lambda i: dict(noise=i["x_t"].clone()), r"noise was given without c"),
    "c without noise": (lambda i: dict(c=torch.ones(2, device=DEVICE)), r"c was given without noise"),
}


@pytest.mark.parametrize("impl", [reference.dmd_target, dmd_target], ids=["reference", "triton"])
@pytest.mark.parametrize("change, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(impl, change, message):
    inputs = make_inputs((2, 3, 4))
    with pytest.raises(ValueError, match=message):
        impl(**inputs | change(inputs))


def test_kernel_rejects_float64_reference_accepts_it():
    inputs = as_fp64(make_inputs((2, 3)))
    reference.dmd_target(**inputs)
    with pytest.raises(ValueError, match=r"x0 must have dtype bfloat16, float16, float32, got torch.float64"):
        dmd_target(**inputs)


@pytest.mark.gpu
@requires_cuda
def test_kernel_rejects_cpu_tensors_on_gpu_machine():
    inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in make_inputs((2, 3)).items()}
    with pytest.raises(ValueError, match=r"the triton backend needs CUDA tensors, got tensors on cpu"):
        dmd_target(**inputs)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", [(8, 16, 128, 128), (2, 336, 60, 104)], ids=["image", "video"])
def test_full_size_latents_bf16(shape):
    assert_matches_reference(make_inputs(shape, torch.bfloat16, weights=True), torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
# The kernel's wait is bounded (NaN statistics then); this bounds the rest. method="thread": a signal
# would not be handled while the main thread is blocked in a CUDA synchronization.
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 16, 64, 64), (64, 16, 128, 128), (2, 336, 60, 104)],
                         ids=["odd", "training", "image_64", "video"])
@pytest.mark.parametrize("max_chunks", [None, 32], ids=["default_chunks", "32_chunks"])
def test_one_pass_kernel_gives_the_two_pass_bits(shape, max_chunks, monkeypatch):
    """Each one-pass call gets, from the caching allocator, a block just filled with NaN for its
    partial sums: a program that read its sample's partial sums before they were all published would
    mix a NaN in and change the bits. Fewer, longer chunks per sample too (the video latent's then
    fit the GPU's SMs)."""
    if max_chunks is not None:
        monkeypatch.setattr(sample_chunks_module, "MAX_CHUNKS", max_chunks)

    def run(inputs, poison: bool = False):
        x0 = inputs["x0"].detach().clone().requires_grad_()
        if poison:  # freed at once: the caching allocator hands this block to the call's partial sums
            torch.full((shape[0] * chunks,), float("nan"), device=DEVICE)
            torch.cuda.synchronize()
        out = dmd_target(**dict(inputs, x0=x0))
        out.loss.backward()
        return out, x0.grad

    chunks = dmd_target_triton.forward_chunks(math.prod(shape[1:]), torch.bfloat16.itemsize,
                                              save_residual=True).num_chunks  # run() takes x0's gradient
    if not dmd_target_triton.one_pass_fits(DEVICE, chunks):  # e.g. the video latent's 256 on an H100
        pytest.skip(f"{chunks} programs per sample exceed this GPU's SMs: the launcher keeps two passes")
    for seed in range(3):
        inputs = make_inputs(shape, torch.bfloat16, weights=True, noise=True, seed=seed)
        monkeypatch.setattr(dmd_target_triton, "ONE_PASS", False)
        two_pass, two_pass_grad = run(inputs)
        monkeypatch.setattr(dmd_target_triton, "ONE_PASS", True)
        one_pass, one_pass_grad = run(inputs, poison=True)
        for name, x, y in zip(two_pass._fields, two_pass, one_pass):
            assert torch.equal(x, y), name
        assert torch.equal(two_pass_grad, one_pass_grad)


@pytest.mark.gpu
@requires_cuda
def test_deterministic_and_batch_invariant():
    inputs = make_inputs((4, 16, 64, 64), torch.bfloat16)
    first, second = dmd_target(**inputs), dmd_target(**inputs)
    for name, x, y in zip(first._fields, first, second):
        assert torch.equal(x, y), name
    single = dmd_target(**{k: v[1:2] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    for name in ("target", "normalizer", "grad_sq", "cosine"):
        assert torch.equal(getattr(single, name), getattr(first, name)[1:2]), name


def test_one_pass_is_chosen_where_two_passes_would_read_the_inputs_twice_from_dram(monkeypatch):
    """The launcher's choice (measured on an H100: one pass faster once pass 1's reads exceed L2,
    slower below): by size unless ONE_PASS forces it, and never where the kernel cannot run."""
    from types import SimpleNamespace

    cuda, l2 = torch.device("cuda"), 50 << 20
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=l2))
    monkeypatch.setattr(dmd_target_triton, "one_pass_fits", lambda device, chunks: chunks <= 132)
    monkeypatch.setattr(dmd_target_triton, "ONE_PASS", None)
    image_64_bf16, image_8_bf16 = 64 * 16 * 128 * 128 * 4 * 2, 8 * 16 * 128 * 128 * 4 * 2
    assert dmd_target_triton.one_pass_enabled(cuda, 128, image_64_bf16)
    assert not dmd_target_triton.one_pass_enabled(cuda, 128, image_8_bf16)
    assert not dmd_target_triton.one_pass_enabled(cuda, 128, l2)
    assert not dmd_target_triton.one_pass_enabled(cuda, 256, image_64_bf16)  # does not fit
    monkeypatch.setattr(dmd_target_triton, "ONE_PASS", True)
    assert dmd_target_triton.one_pass_enabled(cuda, 128, image_8_bf16)
    assert not dmd_target_triton.one_pass_enabled(cuda, 256, image_8_bf16)
    monkeypatch.setattr(dmd_target_triton, "ONE_PASS", False)
    assert not dmd_target_triton.one_pass_enabled(cuda, 128, image_64_bf16)


def test_benchmark_variants_set_the_kernels_knobs_for_their_call_only(monkeypatch):
    """bench_dmd_target's kernel variants run on a GPU only: what they set (one or two passes, the
    chunks per sample) is checked here, and that it is undone after."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_dmd_target

    def knobs(**inputs):
        x0 = inputs["x0"]
        save_residual = x0.requires_grad
        return dmd_target_triton.ONE_PASS, dmd_target_triton.forward_chunks(x0[0].numel(), x0.element_size(),
                                                                             save_residual).num_chunks

    def state():
        return (dmd_target_triton.ONE_PASS, sample_chunks_module.MAX_CHUNKS, dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES,
                dmd_target_triton.MIN_CHUNK_ELEMENT_BYTES_SAVING_RESIDUAL)

    before = state()
    x0 = torch.zeros(2, 16, 128, 128)  # 128 blocks of 2048 per sample: one fp32 block is 8 KB
    bf16 = x0.to(torch.bfloat16)  # two bf16 blocks per chunk
    variants = bench_dmd_target.KERNEL_VARIANTS
    assert variants["triton_two_pass"](knobs)(x0=x0) == (False, 128)
    assert variants["triton_two_pass"](knobs)(x0=bf16) == (False, 64)
    assert variants["triton_two_pass_32_chunks"](knobs)(x0=x0) == (False, 32)
    monkeypatch.setattr(dmd_target_triton, "one_pass_fits", lambda device, chunks: chunks <= 132)
    assert variants["triton_one_pass_32_chunks"](knobs)(x0=bf16) == (True, 32)
    assert variants["triton_one_pass"](knobs)(x0=x0) == (True, 128)
    assert variants["triton_one_pass_one_block_chunks"](knobs)(x0=bf16) == (True, 128)
    assert variants["triton_one_pass_two_block_chunks"](knobs)(x0=bf16.requires_grad_()) == (True, 64)
    assert variants["triton_one_pass"](knobs)(x0=bf16) == (True, 128)  # the launcher's cut with grad
    monkeypatch.setattr(dmd_target_triton, "one_pass_fits", lambda device, chunks: False)
    with pytest.raises(RuntimeError, match="one pass does not apply: 128 programs per sample"):
        variants["triton_one_pass"](knobs)(x0=x0)
    assert state() == before
