"""NucleusMoE-Image (diffusers' NucleusMoEImageTransformer2DModel) as a spec.

Its MoE block is `NucleusMoELayer`: expert-choice routing (each expert takes its top-C tokens of
every sample, C = max(1, ceil(capacity_factor * S / E)), `capacity_factor` per layer from the
config's `capacity_factors`), softmax or sigmoid scores (`use_sigmoid`) in the input dtype,
weights normalised per token over the experts that chose it and scaled by `route_scale`; packed
`SwiGLUExperts` (gate_up_proj [E, H, 2F], down_proj [E, F, H]) and a shared SwiGLU expert
(`shared_expert`, a diffusers FeedForward). Its gate (`gate`, Linear 2H -> E) sees
cat([timestep embedding expanded over S, unmodulated hidden]) while the experts see the
modulated hidden; it is called as `img_mlp(hidden_states, hidden_states_unmodulated, timestep=temb)`.
Dense first / last blocks (`dense_moe_strategy`) keep their diffusers FeedForward.

The model's rotary embedding (`NucleusMoEEmbedRope`) keeps its frequency tables as plain tensor
attributes made in __init__ (not in the weights): the loader re-creates that module on the CPU.
"""
from __future__ import annotations

import torch.nn as nn

from .spec import Attr, CallSignature, ExpertLayout, MoEBlockSpec


def _rebuild_rope(old: nn.Module) -> nn.Module:
    """A fresh NucleusMoEEmbedRope with the same arguments (its pos/neg frequency tables, [4096, D/2] complex)."""
    return type(old)(theta=old.theta, axes_dim=list(old.axes_dim), scale_rope=old.scale_rope)


NUCLEUS = MoEBlockSpec(
    name="nucleusmoe",
    model_class="NucleusMoEImageTransformer2DModel",
    block_class="NucleusMoELayer",
    gate="gate.weight",
    experts=ExpertLayout("packed", "experts", gate_up="gate_up_proj", down="down_proj"),
    routing={
        "routing": "expert_choice",
        "num_experts": Attr("num_experts"),
        "top_k": 1,   # unused by expert choice
        "capacity_factor": Attr("capacity_factor"),
        "score_func": Attr("use_sigmoid", {True: "sigmoid", False: "softmax"}),
        "renormalize": False,
        "route_scale": Attr("route_scale"),
    },
    shared="shared_expert",
    router_input="concat(timestep, unmodulated)",
    call=CallSignature(args=("hidden_states", "hidden_states_unmodulated", "timestep"),
                       expert_input="hidden_states", timestep="timestep",
                       unmodulated="hidden_states_unmodulated"),
    rebuild={"NucleusMoEEmbedRope": _rebuild_rope},
)
