"""perf.fuse_qkv: fused q/k/v projections give the separate projections' outputs, keep one copy of the
weights, and take writes made by the separate parameters' names (the rollout copy's sync)."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from fastdmd.models.fusion import fuse_qkv


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
