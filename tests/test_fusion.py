"""perf.fuse_qkv: fused q/k/v projections give the separate projections' outputs, keep one copy of the
weights, and take writes made by the separate parameters' names (the rollout copy's sync).
perf.gelu_epilogue: the feed-forwards' GELU in the matmul's epilogue where no autograd records."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from fastdmd.models.fusion import GELUEpilogue, LinearGELUEpilogue, fuse_qkv, use_gelu_epilogue


def sd3_net():
    # SD3.5's features too: RMS norms on q and k, and a second (image-only) attention in block 0.
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8,
                                 qk_norm="rms_norm", dual_attention_layers=(0,))


def sd3_inputs(gen):
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), encoder_hidden_states=torch.randn(2, 6, 32, generator=gen),
                pooled_projections=torch.randn(2, 24, generator=gen), timestep=torch.tensor([500.0, 20.0]))


def flux_net():
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                                  guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def flux_inputs(gen):
    return dict(hidden_states=torch.randn(2, 16, 16, generator=gen), encoder_hidden_states=torch.randn(2, 5, 32, generator=gen),
                pooled_projections=torch.randn(2, 24, generator=gen), timestep=torch.tensor([0.5, 0.02]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]))


NETS = {"sd3": (sd3_net, sd3_inputs, 5 * 6), "flux": (flux_net, flux_inputs, 3 * 6)}


def build(name):
    make, inputs, removed = NETS[name]
    torch.manual_seed(0)
    net = make().eval().requires_grad_(False)
    return net, inputs(torch.Generator().manual_seed(1)), removed


@pytest.mark.parametrize("name", NETS)
def test_fused_projections_give_the_separate_projections_outputs(name):
    net, inputs, removed = build(name)
    fused = copy.deepcopy(net)
    views = fuse_qkv(fused)
    assert len(views) == removed  # q, k, v weights and biases of each stream of each attention
    names = dict(fused.named_parameters())
    assert not any(key in names for key in views)  # the separate layers are gone ...
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in net.parameters())  # ... not copied
    assert not any(p.requires_grad for p in fused.parameters())
    assert all(torch.equal(views[key], param) for key, param in net.named_parameters() if key in views)
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs).sample, net(**inputs).sample, rtol=1e-5, atol=1e-6)
    assert fuse_qkv(fused) == {}  # fused once


@pytest.mark.parametrize("name", NETS)
def test_writes_by_the_separate_names_reach_the_fused_layers(name):
    net, inputs, _ = build(name)
    fused = copy.deepcopy(net)
    views = fuse_qkv(fused)
    with torch.no_grad():
        for p in net.parameters():  # an optimizer step on the trained network ...
            p.add_(0.05 * torch.randn_like(p))
        own = dict(fused.named_parameters()) | views
        pairs = [(own[key], p) for key, p in net.named_parameters()]
        torch._foreach_copy_([dst for dst, _ in pairs], [src for _, src in pairs])  # ... synced by name
        torch.testing.assert_close(fused(**inputs).sample, net(**inputs).sample, rtol=1e-5, atol=1e-6)


def test_networks_without_joint_attention_are_left_alone():
    from fastdmd.models.digits import build_digits_unet

    net = build_digits_unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert fuse_qkv(net) == {}
    assert net.state_dict().keys() == before.keys()


@pytest.mark.parametrize("name, takes", [("sd3", False), ("flux", True)])
def test_the_attention_backend_report_knows_which_networks_take_one(name, takes):
    """perf.attention flash / xformers reach FLUX's attention (it dispatches through diffusers) but not
    SD3's (torch SDPA called directly): the run header must not claim a backend that is not used."""
    from fastdmd.accel import takes_attention_backend

    net, _, _ = build(name)
    assert takes_attention_backend(net) is takes


def tanh_gelus(net) -> int:
    """diffusers' GELU modules with tanh GELU, and FLUX's single blocks (proj_mlp, then act_mlp: nn.GELU)."""
    from diffusers.models.activations import GELU

    return sum((isinstance(m, GELU) and m.approximate == "tanh")
               or (isinstance(getattr(m, "act_mlp", None), torch.nn.GELU) and m.act_mlp.approximate == "tanh")
               for m in net.modules())


@pytest.mark.parametrize("name", NETS)
def test_gelu_epilogue_changes_the_class_only_and_on_cpu_nothing_else(name, monkeypatch):
    """Every tanh-GELU projection takes the epilogue form (once: a second call changes nothing); names,
    state dict and a deepcopy are as before. On CPU, where torch._addmm_activation's GELU is the exact
    one, the forward is diffusers' own, bit for bit, with or without grad."""
    net, inputs, _ = build(name)
    patched = copy.deepcopy(net)
    count = use_gelu_epilogue(patched)
    assert count == tanh_gelus(net) > 0
    assert use_gelu_epilogue(patched) == count and use_gelu_epilogue(copy.deepcopy(patched)) == count
    assert sum(isinstance(m, (GELUEpilogue, LinearGELUEpilogue)) for m in patched.modules()) == count
    assert not any(isinstance(m, torch.nn.GELU) for m in patched.modules())  # FLUX's act_mlp: in proj_mlp now
    assert list(patched.state_dict()) == list(net.state_dict())
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: pytest.fail("the epilogue ran on CPU"))
    with torch.no_grad():
        assert torch.equal(patched(**inputs).sample, net(**inputs).sample)
    patched.requires_grad_(True)
    assert torch.equal(patched(**inputs).sample.detach(), net(**inputs).sample)


def test_gelu_epilogue_leaves_networks_without_tanh_gelu_alone():
    from fastdmd.models.digits import build_digits_unet

    assert use_gelu_epilogue(build_digits_unet()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NETS)
def test_gelu_epilogue_on_cuda_gives_the_two_step_output_without_grad_and_the_same_bits_with(name, monkeypatch):
    """bf16 on CUDA: with no grad the epilogue runs (once per projection per forward) and, eager or
    compiled, its error against an fp32 forward is no worse than twice diffusers' own bf16 error in the
    same mode (one rounding instead of two; compiled, inductor fuses and rounds the rest its own way, so
    eager diffusers is no yardstick there); where autograd records, the forward is diffusers' own."""
    net, inputs, _ = build(name)
    reference = copy.deepcopy(net).cuda()
    net = net.cuda().to(torch.bfloat16)
    inputs = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda() for k, v in inputs.items()}
    patched = copy.deepcopy(net)
    count = use_gelu_epilogue(patched)
    calls = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(1) or real(*a, **k))

    def error(module):
        return (module(**inputs).sample.float() - want).abs().max().item()

    with torch.no_grad():
        want = reference(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}).sample
        eager_error = error(net)
        assert eager_error > 0  # bf16 rounds: the bound below is not vacuous
        assert error(patched) <= 2 * eager_error
        assert len(calls) == count
        monkeypatch.setattr(torch, "_addmm_activation", real)  # what dynamo traces
        assert error(torch.compile(patched)) <= 2 * error(torch.compile(net))
    patched.requires_grad_(True)
    net.requires_grad_(True)
    assert torch.equal(patched(**inputs).sample, net(**inputs).sample)
