"""Fused QKV projections (`perf.fuse_qkv`) for the networks whose parameter names nothing keeps: the
frozen teacher, the rollout's bf16 copy of the generator and, with perf.master_weights, the trained
roles' bf16 compute copies (their gradients go to the fused weights; MasterAdamW steps each fp32
q, k or v weight from its rows).

Each attention's query, key and value projections become one linear layer of three times the width,
and so do the text stream's (`add_q_proj`, `add_k_proj`, `add_v_proj`): one matmul instead of three.
At the few-step sampler's batch 1 (1024 image rows, 333 text rows for SD3 at 512 px) three narrow
matmuls leave most of an H100's SMs idle; one wide matmul fills them. The trained networks' fp32
weights keep their separate projections: their parameter names are the checkpoint's and the exported
model's.

SD3's attention (diffusers' `Attention` with `JointAttnProcessor2_0`) gets `FusedJointAttnProcessor`
below, the same computation with the fused projections; diffusers' own `FusedJointAttnProcessor2_0`
drops the q/k RMS norms of SD3.5, so it is not used. FLUX's `FluxAttention` reads fused projections
itself once `fuse_projections()` has run. The separate layers are removed after fusing (no second
copy of the weights); `fuse_qkv` returns, for each removed parameter, its rows of the fused one, so
that code which writes weights by their original names (the rollout copy's per-step sync) writes
into the fused layers.

GELU in the matmul's epilogue (`perf.gelu_epilogue`): the feed-forwards of SD3 and FLUX start with
diffusers' `GELU` (a Linear, then tanh-approximate GELU), and FLUX's single blocks with proj_mlp and
act_mlp, the same two steps. Compiled, that is a matmul and a Triton kernel that adds the bias and
applies GELU, which reads and writes the 4x-wide activation once more. Where nothing needs its
gradient (the rollout, the DMD scores: most forwards of a step), `GELUEpilogue` and
`LinearGELUEpilogue` ask cuBLASLt for the whole (torch._addmm_activation: bias and tanh GELU applied to the
fp32 accumulator before the one rounding; inductor calls it as it is). On CUDA only: on CPU that op
computes the exact GELU, not SD3's tanh form, so there the module runs diffusers' two steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.activations import GELU

SEPARATE = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


class FusedJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3 / SD3.5 joint attention, and SD3.5's image-only second
    attention) with q, k, v from one fused projection per stream."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query, text_key, text_value = (heads(x) for x in attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, text_out = out[:, :hidden_states.shape[1]], out[:, hidden_states.shape[1]:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text_out) if encoder_hidden_states is not None else out


def _fusable(module: nn.Module) -> bool:
    """Attention modules whose fused form is known: SD3's joint attention, FLUX's attention."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    if isinstance(module, Attention):
        return type(module.processor) is JointAttnProcessor2_0 and not module.is_cross_attention
    try:  # diffusers >= 0.35; before, FLUX used the Attention class above with its own processor
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
    except ImportError:
        return False
    return isinstance(module, FluxAttention) and type(module.processor) is FluxAttnProcessor


def fused_attentions(net: nn.Module) -> int:
    """How many attentions of `net` run fused projections (by fuse_qkv, now or before)."""
    return sum(bool(getattr(m, "fused_projections", False)) for m in net.modules())


@torch.no_grad()
def fuse_qkv(net: nn.Module) -> dict[str, torch.Tensor]:
    """Fuse the q/k/v projections of every SD3 / FLUX attention in `net`, in place, and return
    {name of a removed parameter: the rows of the fused parameter that now hold it} (views). Empty
    when `net` has no such attention (the digits UNet)."""
    views = {}
    for name, module in list(net.named_modules()):
        if not _fusable(module) or getattr(module, "fused_projections", False):
            continue
        joint = type(module.processor).__name__ == "JointAttnProcessor2_0"  # SD3's; FLUX's reads the fused layers itself
        module.fuse_projections()  # diffusers': builds to_qkv (and to_added_qkv) from the separate layers
        if joint:
            module.set_processor(FusedJointAttnProcessor())
        for fused_name, parts in SEPARATE.items():
            fused = getattr(module, fused_name, None)
            if fused is None:
                continue
            fused.requires_grad_(getattr(module, parts[0]).weight.requires_grad)  # a new Linear would require grad
            for param_name in ("weight", "bias"):
                whole = getattr(fused, param_name)
                if whole is None:
                    continue
                start = 0
                for part in parts:
                    rows = getattr(getattr(module, part), param_name).shape[0]
                    views[f"{name}.{part}.{param_name}".lstrip(".")] = whole[start:start + rows]
                    start += rows
            for part in parts:
                delattr(module, part)
    return views


def _epilogue_applies(hidden_states: torch.Tensor, proj: nn.Module) -> bool:
    """Whether cuBLASLt's bias + tanh GELU epilogue computes this call: on CUDA, a plain Linear with bias in
    the input's dtype, and no autograd recording (the op has no derivative)."""
    return (hidden_states.is_cuda and type(proj) in (nn.Linear, LinearGELUEpilogue) and proj.bias is not None
            and hidden_states.dtype == proj.weight.dtype
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, proj.weight, proj.bias))))


def _linear_gelu_epilogue(hidden_states: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = torch._addmm_activation(proj.bias, rows, proj.weight.t(), use_gelu=True)
    return out.view(*hidden_states.shape[:-1], out.shape[-1])


class GELUEpilogue(GELU):
    """diffusers' GELU (SD3's and FLUX's feed-forwards: a Linear, then tanh GELU) with the epilogue where
    _epilogue_applies."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh" and _epilogue_applies(hidden_states, self.proj):
            return _linear_gelu_epilogue(hidden_states, self.proj)
        return super().forward(hidden_states)


class LinearGELUEpilogue(nn.Linear):
    """A Linear and the tanh GELU after it in one module: FLUX's single blocks' proj_mlp, whose act_mlp
    (nn.GELU) becomes an Identity. The epilogue where _epilogue_applies, else the two steps."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _epilogue_applies(hidden_states, self):
            return _linear_gelu_epilogue(hidden_states, self)
        return F.gelu(super().forward(hidden_states), approximate="tanh")


def use_gelu_epilogue(net: nn.Module) -> int:
    """Give every tanh-GELU feed-forward projection of `net` the epilogue form, in place: diffusers' GELU
    modules (approximate='tanh'), and the proj_mlp + act_mlp (nn.GELU, tanh) pairs of FLUX's single blocks.
    Classes change (and act_mlp becomes an Identity), parameters, names and state dict do not. Returns how
    many projections `net` has in that form; the digits UNet has none."""
    count = 0
    for module in net.modules():
        if type(module) in (GELU, GELUEpilogue) and module.approximate == "tanh":
            module.__class__ = GELUEpilogue
            count += 1
        proj, act = getattr(module, "proj_mlp", None), getattr(module, "act_mlp", None)
        if type(proj) is nn.Linear and type(act) is nn.GELU and act.approximate == "tanh":
            proj.__class__ = LinearGELUEpilogue
            module.act_mlp = nn.Identity()
        if type(proj) is LinearGELUEpilogue:
            count += 1
    return count
