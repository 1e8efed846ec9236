"""HiDream-I1 (diffusers' HiDreamImageTransformer2DModel) as a spec.

Its MoE block is `MOEFeedForwardSwiGLU`: a `MoEGate` (weight [E, H], softmax scores in the
input dtype, top-k = `num_activated_experts` (2 of 4 in I1), no renormalisation
(`norm_topk_prob` False), no route scale), E SwiGLU experts `HiDreamImageFeedForwardSwiGLU`
(w1 / w3 [F, H], w2 [H, F]; F = 6912 at hidden 2560) and a shared SwiGLU expert of half width
(`shared_experts`). It is the `ff_i` of the 16 dual-stream blocks (image tokens only) and of the
32 single-stream blocks (image and text tokens together): 48 MoE layers, called as `ff_i(x)`.
"""
from __future__ import annotations

from .spec import Attr, CallSignature, ExpertLayout, MoEBlockSpec

HIDREAM = MoEBlockSpec(
    name="hidream",
    model_class="HiDreamImageTransformer2DModel",
    block_class="MOEFeedForwardSwiGLU",
    gate="gate.weight",
    experts=ExpertLayout("module_list", "experts", w1="w1", w3="w3", w2="w2"),
    routing={
        "routing": "token_choice",
        "num_experts": Attr("gate.n_routed_experts"),
        "top_k": Attr("gate.top_k"),
        "score_func": Attr("gate.scoring_func"),
        "renormalize": Attr("gate.norm_topk_prob"),
        "route_scale": 1.0,
    },
    shared="shared_experts",
    router_input="hidden",
    call=CallSignature(args=("x",), expert_input="x"),
)
