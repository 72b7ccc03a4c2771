"""MasterAdamW's fused update (fastdmd/ops/master_adamw_triton.py) against torch's AdamW and the
reference (fastdmd/ops/reference.py), and the optimizer around it (fastdmd/optim.py).

On a machine without a GPU the kernel runs in the Triton interpreter on CPU; with a GPU the same
tests run the compiled kernel on CUDA, and the tests marked gpu run too.
"""

import copy
import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest
import torch

from fastdmd.ops import master_adamw_triton, reference
from fastdmd.ops.master_adamw_triton import master_adamw_
from fastdmd.ops.testing import default_device
from fastdmd.optim import MasterAdamW, NoMomentumAdamW

DEVICE = default_device()
IMPLS = pytest.mark.parametrize("impl", [reference.master_adamw_, master_adamw_], ids=["reference", "triton"])
# one element, odd sizes, a strided 2-D weight, more than one block (the tests shrink the block to 64)
SHAPES = [(1,), (7, 5), (129,), (3, 50), (64,)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
# The bf16/fp16 copy is the fp32 weight rounded: to nearest on the GPU (as torch), by truncation in the
# Triton interpreter, so there the copy may sit one unit in the last place below.
COPY_RTOL = 0.0 if DEVICE.type == "cuda" else 2.0**-7


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(master_adamw_triton, "BLOCK", 64)


def state(shapes, copy_dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masters = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    return dict(masters=masters, exp_avgs=[torch.zeros_like(m) for m in masters],
                exp_avg_sqs=[torch.zeros_like(m) for m in masters], copies=[m.to(copy_dtype) for m in masters],
                emas=[m.clone() for m in masters])


def grads_for(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(s, generator=gen)).to(dtype).to(DEVICE) for s in shapes]


def torch_adamw(masters, grads_per_step, scale, lr, beta1, beta2, eps, weight_decay):
    params = [m.clone().requires_grad_() for m in masters]
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=False)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.float() * scale
        opt.step()
    return [p.detach() for p in params], opt


def assert_update_close(actual, expected, initial, name):
    """The change from the initial weight, which is what the optimizer computes, to fp32 precision (atol: a
    few units in the last place of weights of size 1 to 4, where the two formulas round differently)."""
    for i, (a, e, w) in enumerate(zip(actual, expected, initial)):
        torch.testing.assert_close(a - w, e - w, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}[{i}]: {m}")


@IMPLS
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("beta1", [0.9, 0.0], ids=["beta1", "beta1_zero"])  # 0: DMD2's, exp_avg not read
def test_three_steps_match_torch_adamw_on_the_gradients_in_fp32(impl, grad_dtype, beta1):
    s = state(SHAPES)
    initial = [m.clone() for m in s["masters"]]
    scale = torch.tensor(0.5, device=DEVICE)
    grads_per_step = [grads_for(SHAPES, grad_dtype, seed) for seed in (1, 2, 3)]
    hyper = HYPER | dict(beta1=beta1)
    for step, grads in enumerate(grads_per_step, start=1):
        impl(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=step, grad_scale=scale, **hyper)
    want, opt = torch_adamw(initial, grads_per_step, 0.5, **hyper)
    assert_update_close(s["masters"], want, initial, "masters")
    for i, p in enumerate(opt.param_groups[0]["params"]):
        torch.testing.assert_close(s["exp_avgs"][i], opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s["exp_avg_sqs"][i], opt.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-7)
    for copy, master in zip(s["copies"], s["masters"]):
        torch.testing.assert_close(copy.float(), master.to(copy.dtype).float(), rtol=COPY_RTOL, atol=0)


@IMPLS
@pytest.mark.parametrize("decay", [0.99, 0.3])  # torch.lerp's two formulas: weight below and above 0.5
def test_the_ema_moves_as_foreach_lerp_after_the_update(impl, decay):
    s = state(SHAPES)
    emas = [torch.randn(m.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE) for m in s["masters"]]
    want = [e.clone() for e in emas]
    impl(s["masters"], grads_for(SHAPES, torch.bfloat16, 1), s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=1,
         emas=emas, ema_weight=1 - decay, **HYPER)
    torch._foreach_lerp_(want, s["masters"], 1 - decay)
    for i, (e, w) in enumerate(zip(emas, want)):
        torch.testing.assert_close(e, w, rtol=1e-6, atol=1e-7, msg=f"emas[{i}]")


@IMPLS
def test_with_beta1_zero_the_first_moment_is_written_not_read(impl):
    """beta1 = 0 (DMD2's): exp_avg becomes the (scaled) gradient, as in torch's AdamW, without being read:
    NaN left in it changes nothing."""
    clean, poisoned = state(SHAPES), state(SHAPES)
    for m in poisoned["exp_avgs"]:
        m.fill_(float("nan"))
    grads = grads_for(SHAPES, torch.bfloat16, 1)
    scale = torch.tensor(0.5, device=DEVICE)
    for s in (clean, poisoned):
        impl(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=2, grad_scale=scale,
             **HYPER | dict(beta1=0.0))
    for name in ("masters", "exp_avg_sqs", "copies"):
        for a, b in zip(clean[name], poisoned[name]):
            assert torch.equal(a, b), name
    for m, g in zip(poisoned["exp_avgs"], grads):
        assert torch.equal(m, g.float() * scale)


@IMPLS
def test_with_beta1_zero_and_no_first_moments_the_update_is_the_same(impl):
    """exp_avgs None (MasterAdamW's state at beta1 = 0): the same weights, second moments, copies and EMA
    as with exp_avgs given, bit for bit; with beta1 > 0 it is refused, naming beta1."""
    kept, none = state(SHAPES), state(SHAPES)
    scale = torch.tensor(0.5, device=DEVICE)
    for step, seed in ((1, 1), (2, 2)):
        grads = grads_for(SHAPES, torch.bfloat16, seed)
        for s, exp_avgs in ((kept, kept["exp_avgs"]), (none, None)):
            impl(s["masters"], grads, exp_avgs, s["exp_avg_sqs"], s["copies"], step=step, grad_scale=scale,
                 emas=s["emas"], ema_weight=0.1, **HYPER | dict(beta1=0.0))
    for name in ("masters", "exp_avg_sqs", "copies", "emas"):
        for a, b in zip(kept[name], none[name]):
            assert torch.equal(a, b), name
    assert not any(m.any() for m in none["exp_avgs"])  # never given, never written
    with pytest.raises(ValueError, match=r"exp_avgs None .* needs beta1 = 0.*got beta1 = 0\.9"):
        impl(none["masters"], grads, None, none["exp_avg_sqs"], none["copies"], step=3, **HYPER)


@IMPLS
def test_zero_gradients_leave_only_the_weight_decay(impl):
    s = state(SHAPES)
    initial = [m.clone() for m in s["masters"]]
    zeros = [torch.zeros(sh, dtype=torch.bfloat16, device=DEVICE) for sh in SHAPES]
    impl(s["masters"], zeros, s["exp_avgs"], s["exp_avg_sqs"], None, step=1, **HYPER)
    for m, w in zip(s["masters"], initial):
        torch.testing.assert_close(m, w * (1 - HYPER["lr"] * HYPER["weight_decay"]), rtol=1e-6, atol=0)
    assert all(not v.any() for v in s["exp_avgs"] + s["exp_avg_sqs"])


@IMPLS
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf / inf
def test_non_finite_gradients_spoil_their_own_elements_as_in_torch_adamw(impl):
    s = state(SHAPES)
    initial = [m.clone() for m in s["masters"]]
    grads = grads_for(SHAPES, torch.bfloat16, 1)
    grads[1][2, 3], grads[2][0], grads[2][100] = float("nan"), float("inf"), float("-inf")
    impl(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=1, **HYPER)
    want, _ = torch_adamw(initial, [grads], 1.0, **HYPER)
    for got, expected in zip(s["masters"], want):
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    assert s["masters"][1].isnan().sum() == 1 and s["masters"][2].isnan().sum() == 2
    assert_update_close(s["masters"], want, initial, "masters")


@IMPLS
def test_a_strided_gradient_is_read_in_its_logical_order(impl):
    s = state([(6, 10)])
    initial = [m.clone() for m in s["masters"]]
    grad = grads_for([(10, 6)], torch.bfloat16, 1)[0].t()  # the layout of a weight gradient computed transposed
    assert not grad.is_contiguous()
    impl(s["masters"], [grad], s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=1, **HYPER)
    want, _ = torch_adamw(initial, [[grad]], 1.0, **HYPER)
    assert_update_close(s["masters"], want, initial, "masters")


@IMPLS
def test_nothing_to_update_is_no_error(impl):
    impl([], [], [], [], [], step=1, **HYPER)


@IMPLS
@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(grads=a["grads"][:-1]), r"one entry per parameter, got lengths"),
    (lambda a: a["masters"].__setitem__(0, a["masters"][0].half()), r"masters\[0\] must have dtype float32, got torch.float16"),
    (lambda a: a["copies"].__setitem__(1, a["copies"][1][:, :2].contiguous()), r"copies\[1\] must have shape \(7, 5\), got \(7, 2\)"),
    (lambda a: a["exp_avgs"].__setitem__(1, a["exp_avgs"][1].t().contiguous().t()), r"exp_avgs\[1\] must be contiguous"),
    (lambda a: a["grads"].__setitem__(0, a["grads"][0].float()), r"all grads must share one dtype"),
    (lambda a: a["grads"].__setitem__(1, a["grads"][1].to(torch.int32)), r"grads\[1\] must have dtype"),
    (lambda a: a.update(step=0), r"step must be an int >= 1"),
    (lambda a: a.update(beta1=1.0), r"beta1 must be in \[0, 1\), got 1.0"),
    (lambda a: a.update(lr=float("nan")), r"lr must be a finite number, got nan"),
    (lambda a: a.update(grad_scale=torch.ones(2, device=DEVICE)), r"grad_scale must hold one value"),
    (lambda a: a.update(grad_scale=torch.ones((), dtype=torch.float64, device=DEVICE)), r"grad_scale must have dtype float32"),
    (lambda a: a.update(emas=[m.clone() for m in a["masters"]], ema_weight=1.5),
     r"ema_weight \(1 - EMA decay\) must be in \[0, 1\], got 1.5"),
    (lambda a: a.update(masters=3), r"masters must be a list of tensors \(one per parameter\), got int"),
    (lambda a: a["exp_avgs"].__setitem__(0, a["exp_avg_sqs"][0]), r"exp_avgs\[0\] shares memory with exp_avg_sqs\[0\]|"
                                                                  r"exp_avg_sqs\[0\] shares memory with exp_avgs\[0\]"),
    (lambda a: a.update(masters=[a["masters"][0]] * 2, grads=[a["grads"][0]] * 2, exp_avgs=a["exp_avgs"][:1] * 2,
                        exp_avg_sqs=a["exp_avg_sqs"][:1] * 2, copies=a["copies"][:1] * 2),
     r"masters\[1\] shares memory with masters\[0\]|copies\[1\] shares memory with copies\[0\]|"
     r"exp_avgs\[1\] shares memory with exp_avgs\[0\]|exp_avg_sqs\[1\] shares memory"),
])
def test_bad_inputs_raise_a_value_error_that_names_them(impl, change, message):
    s = state(SHAPES[:2])
    args = dict(masters=s["masters"], grads=grads_for(SHAPES[:2], torch.bfloat16, 1), exp_avgs=s["exp_avgs"],
                exp_avg_sqs=s["exp_avg_sqs"], copies=s["copies"], step=1, **HYPER)
    change(args)
    with pytest.raises(ValueError, match=message):
        impl(**args)


@pytest.mark.parametrize("beta1", [0.9, 0.0], ids=["beta1", "beta1_zero"])
def test_master_adamw_continues_a_torch_adamw_state_and_writes_the_copies(beta1):
    """The optimizer's state dict is torch AdamW's: a checkpoint of either resumes in the other. Gradients
    come from the copies; a parameter whose copy has none uses its own (DCP initializes state that way).
    At beta1 = 0 no exp_avg is kept (dropped on load) and the state dict holds zeros in its place."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[(torch.randn(s, generator=gen)).to(torch.bfloat16) for s in SHAPES] for _ in range(4)]
    betas = (beta1, 0.999)
    plain = [w.clone().requires_grad_() for w in weights]
    torch_opt = torch.optim.AdamW(plain, lr=1e-2, betas=betas, weight_decay=0.1, foreach=False)
    masters = [w.clone().requires_grad_() for w in weights]
    copies = [w.to(torch.bfloat16).requires_grad_() for w in weights]
    master_opt = MasterAdamW(masters, copies, lr=1e-2, betas=betas, weight_decay=0.1)
    for step, g in enumerate(grads[:3]):
        for p, x in zip(plain, g):
            p.grad = x.float()
        torch_opt.step()
        if step == 0:  # the first step by torch, then its state is loaded
            with torch.no_grad():
                for m, p in zip(masters, plain):
                    m.copy_(p)
            master_opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as if read from disk: not shared
            continue
        for c, x in zip(copies, g):
            c.grad = x
        master_opt.step()
        master_opt.zero_grad()
        assert all(c.grad is None for c in copies)
    assert_update_close([m.detach() for m in masters], [p.detach() for p in plain], weights, "masters")
    for c, m in zip(copies, masters):
        torch.testing.assert_close(c.detach().float(), m.detach().to(torch.bfloat16).float(), rtol=0, atol=0)
    assert {float(s["step"]) for s in master_opt.state.values()} == {3.0}
    kept = {"step", "exp_avg_sq"} | ({"exp_avg"} if beta1 else set())
    assert all(s.keys() == kept for s in master_opt.state.values())
    saved = copy.deepcopy(master_opt.state_dict())
    assert all(list(s) == ["step", "exp_avg", "exp_avg_sq"] for s in saved["state"].values())
    assert all(s.keys() == kept for s in master_opt.state.values())  # saving added nothing to the optimizer
    if beta1 == 0:
        assert not any(s["exp_avg"].any() for s in saved["state"].values())
    fresh_params = [m.detach().clone().requires_grad_() for m in masters]
    fresh = torch.optim.AdamW(fresh_params, lr=1e-2, betas=betas, weight_decay=0.1, foreach=False)
    fresh.load_state_dict(saved)  # and back: its next step is MasterAdamW's
    for p, c, x in zip(fresh_params, copies, grads[3]):
        p.grad = x.float()
        c.grad = x
    fresh.step()
    master_opt.step()
    assert_update_close([m.detach() for m in masters], [p.detach() for p in fresh_params], weights, "resumed")


def test_master_adamw_refuses_copies_that_do_not_match():
    with pytest.raises(ValueError, match="one bf16 copy per fp32 parameter, same shapes: got 2 parameters and 1 copies"):
        MasterAdamW([torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)],
                    [torch.zeros(3, dtype=torch.bfloat16)], lr=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_many_large_tensors_matches_the_reference(monkeypatch):
    """The GPU's block (1024) over tensors larger than 2^21 elements and many small ones, with EMA and clipping."""
    monkeypatch.setattr(master_adamw_triton, "BLOCK", 1024)
    shapes = [(1536, 1536), (3 * 1024 * 1024 + 5,)] + [(1536,)] * 40 + [(1,)]
    a, b = state(shapes), state(shapes)
    scale = torch.tensor(0.25, device=DEVICE)
    for step in (1, 2):
        grads = grads_for(shapes, torch.bfloat16, step)
        for impl, s in ((reference.master_adamw_, a), (master_adamw_, b)):
            impl(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=step, grad_scale=scale,
                 emas=s["emas"], ema_weight=0.01, **HYPER)
    initial = state(shapes)["masters"]
    assert_update_close(b["masters"], a["masters"], initial, "masters")
    for name in ("exp_avgs", "exp_avg_sqs", "emas"):
        for x, y in zip(b[name], a[name]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    for x, y in zip(b["copies"], b["masters"]):
        assert torch.equal(x, y.to(torch.bfloat16))


def test_parameters_step_together_on_one_count_and_apart_when_one_has_no_gradient():
    """The states of parameters stepped together share one step count (one host add per update); a
    parameter left without a gradient keeps its count, as in torch AdamW, and the state dict has one
    count per parameter either way."""
    params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    copies = [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    opt = MasterAdamW(params, copies, lr=1e-2)

    def update(*stepped):
        for i in stepped:
            copies[i].grad = torch.ones(3, dtype=torch.bfloat16)
        opt.step()
        opt.zero_grad()
        return [float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in params]

    assert update(0, 1, 2) == [1.0, 1.0, 1.0]
    assert len({id(opt.state[p]["step"]) for p in params}) == 1
    assert update(0, 1) == [2.0, 2.0, 1.0]
    assert update(0, 1, 2) == [3.0, 3.0, 2.0]
    assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == [3.0, 3.0, 2.0]


def test_the_ops_switch_picks_the_update_and_native_takes_autos_choice(monkeypatch):
    from fastdmd import ops

    for backend, want in (("auto", "reference"), ("reference", "reference"), ("native", "reference"),
                          ("triton", "triton")):
        monkeypatch.setattr(ops, "backend", backend)
        assert ops.master_adamw_backend(torch.device("cpu")) == want
    monkeypatch.setattr(ops, "backend", "native")  # no native build of the update: never a failed step
    assert ops.master_adamw_backend(torch.device("cuda")) == "triton"
    s = state([(3,)])
    ops.master_adamw_([m.cpu() for m in s["masters"]], [torch.ones(3, dtype=torch.bfloat16)],
                      [torch.zeros(3)], [torch.zeros(3)], None, step=1, **HYPER)


@IMPLS
def test_tensors_at_unaligned_addresses_update_like_aligned_ones(impl):
    """The kernel vectorizes only when every address is 16-byte aligned; a view at an odd offset (4 bytes
    past an aligned start) takes the unvectorized path, to the same numbers."""
    aligned, unaligned = state(SHAPES), state(SHAPES)
    for key in ("masters", "exp_avgs", "exp_avg_sqs", "emas"):
        unaligned[key] = [torch.cat([torch.zeros(1, device=DEVICE), t.reshape(-1)])[1:].view(t.shape)
                          for t in unaligned[key]]
    assert unaligned["masters"][2].data_ptr() % 16 == 4
    grads = grads_for(SHAPES, torch.bfloat16, 1)
    for s in (aligned, unaligned):
        impl(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=1, emas=s["emas"],
             ema_weight=0.1, **HYPER)
    for key in ("masters", "exp_avgs", "exp_avg_sqs", "emas", "copies"):
        for x, y in zip(aligned[key], unaligned[key]):
            assert torch.equal(x, y), key


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_optimizer_steps_through_one_plan_as_torch_adamw_with_fused_rows_ema_clipping_and_a_reload(
        monkeypatch, backend):
    """MasterAdamW's usual step (every copy has a gradient) updates through one plan of its tensors, made
    at the second step and kept: copies that tile a fused weight's rows (perf.fuse_qkv) read one split of
    its gradient; rows that do not tile it read their own view. After load_state_dict the plan is made
    again on the loaded tensors: an old one would update the tensors it was made with."""
    from fastdmd import ops

    monkeypatch.setattr(ops, "backend", backend)
    gen = torch.Generator().manual_seed(0)
    fused = torch.zeros(9, 4, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)  # q, k, v rows: tiles
    partial = torch.zeros(5, 3, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)  # rows 1..3 only
    copies = [fused[0:2], fused[2:5], fused[5:9], partial[1:4],
              torch.zeros(70, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)]
    weights = [torch.randn(c.shape, generator=gen).to(DEVICE) for c in copies]
    with torch.no_grad():
        for c, w in zip(copies, weights):
            c.copy_(w)
    masters = [w.clone().requires_grad_() for w in weights]
    opt = MasterAdamW(masters, copies, lr=1e-2, betas=(HYPER["beta1"], HYPER["beta2"]), weight_decay=0.1)
    ema = {m: m.detach().clone() for m in masters}
    scale = torch.tensor([0.5], device=DEVICE)
    plain = [w.clone().requires_grad_() for w in weights]
    torch_opt = torch.optim.AdamW(plain, lr=1e-2, betas=(HYPER["beta1"], HYPER["beta2"]), weight_decay=0.1,
                                  foreach=False)
    want_ema = [w.clone() for w in weights]
    plans = []
    for step in range(4):
        grads = [(3 * torch.randn(c.shape, generator=gen)).to(torch.bfloat16).to(DEVICE) for c in copies]
        fused.grad = torch.cat(grads[:3])
        partial.grad = torch.zeros_like(partial)
        partial.grad[1:4] = grads[3]
        copies[4].grad = grads[4]
        opt.step(grad_scale=scale, ema=(ema, 0.9))
        opt.zero_grad()
        plans.append(opt._plans.get(0))
        for p, g in zip(plain, grads):
            p.grad = g.float() * 0.5
        torch_opt.step()
        for e, p in zip(want_ema, plain):
            e.lerp_(p.detach(), 0.1)
        if step == 1:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from disk: new state tensors
    assert plans[0] is None and plans[1] is not None and plans[2] is not plans[1] and plans[3] is plans[2]
    assert_update_close([m.detach() for m in masters], [p.detach() for p in plain], weights, "masters")
    for name in ("exp_avg", "exp_avg_sq"):
        for m, p in zip(masters, plain):
            torch.testing.assert_close(opt.state[m][name], torch_opt.state[p][name], rtol=1e-5, atol=1e-7)
    for m, e in zip(masters, want_ema):
        torch.testing.assert_close(ema[m], e, rtol=1e-5, atol=1e-6)
    for c, m in zip(copies, masters):
        torch.testing.assert_close(c.detach().float(), m.detach().to(torch.bfloat16).float(), rtol=COPY_RTOL, atol=0)


def test_a_plans_tensor_given_new_storage_is_checked_again_and_updated_where_it_now_lives():
    """The Triton launcher keeps the plan's addresses on the device and compares them on each update: a
    master or copy given new storage (param.data = ...) is updated there, and one of another shape is refused."""
    s = state(SHAPES[:2])
    plan = reference.MasterAdamWPlan(s["masters"], s["exp_avgs"], s["exp_avg_sqs"], s["copies"])
    grads = grads_for(SHAPES[:2], torch.bfloat16, 1)
    master_adamw_triton.master_adamw_update_(plan, grads, step=1, **HYPER)
    moved = s["masters"][1].clone() + 1.0
    expected = state(SHAPES[:2])
    expected["masters"][1] = moved.clone()
    s["masters"][1].data = moved
    reference.master_adamw_(expected["masters"], grads, [e.clone() for e in s["exp_avgs"]],
                            [e.clone() for e in s["exp_avg_sqs"]], None, step=2, **HYPER)
    master_adamw_triton.master_adamw_update_(plan, grads, step=2, **HYPER)
    torch.testing.assert_close(s["masters"][1], expected["masters"][1], rtol=1e-6, atol=1e-7)
    s["copies"][1].data = torch.zeros_like(s["copies"][1])  # a copy moved (module.to): written where it now is
    master_adamw_triton.master_adamw_update_(plan, grads, step=3, **HYPER)
    torch.testing.assert_close(s["copies"][1].float(), s["masters"][1].detach().to(torch.bfloat16).float(),
                               rtol=COPY_RTOL, atol=0)
    s["masters"][0].data = torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must have shape \(2,\), got \(1,\)"):
        master_adamw_triton.master_adamw_update_(plan, grads, step=4, **HYPER)


@IMPLS
def test_a_nonzero_skip_flag_writes_nothing_and_a_zero_one_updates_as_without(impl):
    """skip (the trainer's non-finite loss or gradient, decided on the device): nonzero, the weights,
    moments, copies and EMA keep their bits, even with NaN gradients; zero, the update is the plain one."""
    grads = grads_for(SHAPES, torch.bfloat16, 1)
    grads[1][0, 0] = float("nan")
    s = state(SHAPES)
    before = {name: [t.clone() for t in s[name]] for name in s}
    impl(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=1, emas=s["emas"], ema_weight=0.1,
         skip=torch.tensor(True, device=DEVICE), **HYPER)
    for name in s:
        assert all(torch.equal(a, b) for a, b in zip(s[name], before[name])), name
    grads = grads_for(SHAPES, torch.bfloat16, 2)
    plain, flagged = state(SHAPES), state(SHAPES)
    for s, skip in ((plain, None), (flagged, torch.zeros((1,), dtype=torch.int32, device=DEVICE))):
        impl(s["masters"], grads, s["exp_avgs"], s["exp_avg_sqs"], s["copies"], step=1, emas=s["emas"],
             ema_weight=0.1, skip=skip, **HYPER)
    for name in plain:
        assert all(torch.equal(a, b) for a, b in zip(flagged[name], plain[name])), name


@IMPLS
def test_a_skip_flag_of_more_than_one_value_is_refused(impl):
    s = state(SHAPES[:1])
    with pytest.raises(ValueError, match=r"skip must hold one value"):
        impl(s["masters"], grads_for(SHAPES[:1], torch.bfloat16, 1), s["exp_avgs"], s["exp_avg_sqs"], s["copies"],
             step=1, skip=torch.zeros(2, dtype=torch.bool, device=DEVICE), **HYPER)


def test_no_momentum_adamw_is_torch_fused_adamw_at_beta1_zero_without_exp_avg():
    """The same bits as torch.optim.AdamW(fused=True) at beta1 0 (weights and second moments, three steps, one
    parameter left without a gradient at step 2), no exp_avg in its states, torch AdamW's state dict (zeros
    for exp_avg) loading into torch's AdamW and back; beta1 > 0 refused, naming it."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES]
    plain = [w.clone().requires_grad_() for w in weights]
    ours = [w.clone().requires_grad_() for w in weights]
    hyper = dict(lr=1e-2, betas=(0.0, 0.99), weight_decay=0.1)
    torch_opt, opt = torch.optim.AdamW(plain, fused=True, **hyper), NoMomentumAdamW(ours, **hyper)
    for step in range(3):
        grads = [torch.randn(w.shape, generator=gen).to(DEVICE) for w in weights]
        for i, (p, q, g) in enumerate(zip(plain, ours, grads)):
            p.grad = q.grad = None if (step == 1 and i == 0) else g.clone()
        torch_opt.step()
        opt.step()
    for p, q in zip(plain, ours):
        assert torch.equal(p, q) and torch.equal(torch_opt.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
        assert float(torch_opt.state[p]["step"]) == float(opt.state[q]["step"])
        assert opt.state[q].keys() == {"step", "exp_avg_sq"}
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0].keys() == torch_opt.state_dict()["param_groups"][0].keys()
    assert all(list(s) == ["step", "exp_avg", "exp_avg_sq"] and not s["exp_avg"].any() for s in saved["state"].values())
    resumed = [q.detach().clone().requires_grad_() for q in ours]
    torch_again = torch.optim.AdamW(resumed, fused=True, **hyper)
    torch_again.load_state_dict(saved)
    back = NoMomentumAdamW([p.detach().clone().requires_grad_() for p in plain], **hyper)
    back.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert all(s.keys() == {"step", "exp_avg_sq"} for s in back.state.values())
    grads = [torch.randn(w.shape, generator=gen).to(DEVICE) for w in weights]
    for group in (resumed, back.param_groups[0]["params"], ours):  # on CUDA: the kernel with exp_avgs = grads
        for p, g in zip(group, grads):
            p.grad = g.clone()
    torch_again.step()
    back.step()
    opt.step()
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(resumed, back.param_groups[0]["params"], ours))
    with pytest.raises(ValueError, match=r"needs beta1 = 0, got betas \(0.9, 0.999\)"):
        NoMomentumAdamW(ours, lr=1e-3, betas=(0.9, 0.999))
