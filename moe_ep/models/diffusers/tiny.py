"""Tiny random-config HiDream and NucleusMoE transformers, built with diffusers' own classes, and
inputs for them: for tests, benchmarks and docs examples (no download).

Sizes: HiDream hidden 32 (4 heads of 8), 4 experts, top-2, expert hidden 256 (its SwiGLU rounds
to a multiple of 256), `dual` dual-stream + `single` single-stream blocks (one MoE layer each).
NucleusMoE hidden 64 (8 heads of 8), 8 experts, expert hidden 24, `layers` blocks, the first dense.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def hidream_config(dual: int = 1, single: int = 2, experts: int = 4, top_k: int = 2, heads: int = 4,
                   head_dim: int = 8) -> dict:
    """A HiDreamImageTransformer2DModel config: hidden heads*head_dim, 4 latent channels, 8x8 max latent."""
    rope = (head_dim // 4, head_dim // 4, head_dim // 2)          # 3 position axes, sum = head_dim
    return dict(patch_size=2, in_channels=4, num_layers=dual, num_single_layers=single, attention_head_dim=head_dim,
                num_attention_heads=heads, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=experts,
                num_activated_experts=top_k, axes_dims_rope=rope, max_resolution=(8, 8),
                llama_layers=list(range(dual + single)))


def nucleus_config(layers: int = 4, experts: int = 8, capacity_factors=(2.0, 2.0, 3.0, 1.5),
                   use_sigmoid: bool = False, route_scale: float = 2.5) -> dict:
    """A NucleusMoEImageTransformer2DModel config: hidden 64 (at 32 its dense FeedForward rounds to
    width 0), 16 input channels, first block dense."""
    return dict(patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=8, num_attention_heads=8,
                joint_attention_dim=16, axes_dims_rope=(2, 2, 4), num_experts=experts, moe_intermediate_dim=24,
                capacity_factors=list(capacity_factors)[:layers], use_sigmoid=use_sigmoid, route_scale=route_scale,
                dense_moe_strategy="leave_first_block_dense")


@torch.no_grad()
def init_random(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter ~ N(0, 1/fan_in) (biases N(0, 0.02^2)) from `seed`: diffusers leaves NucleusMoE's
    packed experts uninitialised (torch.empty), and a seeded init makes every rank's copy the same."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.numel() == 0:  # diffusers' Attention makes some zero-size parameters
            continue
        if p.dim() == 1:
            std = 0.02
        elif name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
            std = p.shape[1] ** -0.5                                   # packed [E, in, out]
        else:
            std = p.shape[-1] ** -0.5                                  # Linear [out, in]
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_hidream(seed: int = 0, **kw) -> nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    return init_random(HiDreamImageTransformer2DModel.from_config(hidream_config(**kw)), seed).eval()


def tiny_nucleus(seed: int = 0, **kw) -> nn.Module:
    from diffusers import NucleusMoEImageTransformer2DModel

    return init_random(NucleusMoEImageTransformer2DModel.from_config(nucleus_config(**kw)), seed).eval()


def hidream_inputs(model: nn.Module, seed: int, batch: int, t: float) -> dict:
    """Forward kwargs: latents [B, 4, 8, 8], timesteps [B] (t in [0, 1] -> 1000 t), T5 [B, 5, 16],
    Llama [layers, B, 3, 8], pooled [B, 16]."""
    g = torch.Generator().manual_seed(seed)
    n_llama = len(model.config.llama_layers)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                timesteps=torch.full((batch,), 1000.0 * t),
                encoder_hidden_states_t5=torch.randn(batch, 5, 16, generator=g),
                encoder_hidden_states_llama3=torch.randn(n_llama, batch, 3, 8, generator=g),
                pooled_embeds=torch.randn(batch, 16, generator=g), return_dict=False)


def nucleus_inputs(model: nn.Module, seed: int, batch: int, t: float) -> dict:
    """Forward kwargs: packed latents [B, 16 tokens (4x4), 16], text [B, 5, 16], timestep [B] = t."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=g), img_shapes=[(1, 4, 4)] * batch,
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                timestep=torch.full((batch,), float(t)), return_dict=False)


def save_tiny_folders(root: str, seed: int = 0) -> dict[str, str]:
    """Save a tiny HiDream as a sharded transformer folder (index + several safetensors files) and a
    tiny NucleusMoE as a pipeline folder (model_index.json + transformer/) under `root`.
    -> {"hidream": folder, "nucleus": folder} (the paths to give as model.path)."""
    import os

    from moe_ep.atomic import write_json_atomic

    hd = os.path.join(root, "hidream")
    tiny_hidream(seed).save_pretrained(hd, max_shard_size="200KB")
    nc = os.path.join(root, "nucleus")
    tiny_nucleus(seed + 1).save_pretrained(os.path.join(nc, "transformer"))
    write_json_atomic(os.path.join(nc, "model_index.json"),
                      {"_class_name": "NucleusMoEImagePipeline",
                       "transformer": ["diffusers", "NucleusMoEImageTransformer2DModel"]})
    return {"hidream": hd, "nucleus": nc}
