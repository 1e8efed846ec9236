"""Single-process dense reference for the MoE layer: every logical expert in one place."""
from __future__ import annotations

import torch

from moe_ep.experts import init_expert_weights, swiglu


def logical_weights(seed: int, layer: int, num_experts: int, hidden: int, inner: int):
    """w13 [E, H, 2F], w2 [E, F, H] as the runtime initialises them."""
    pairs = [init_expert_weights(seed, layer, e, hidden, inner) for e in range(num_experts)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@torch.no_grad()
def reference_moe(x, router, w13, w2, shared=None):
    """x [T, H] -> [T, H]: each token through its router's top-k experts, weighted, summed."""
    weights, ids = router(x)                                          # [T, k]
    T, k = ids.shape
    y = torch.zeros(T, k, x.shape[1])
    for e in range(w13.shape[0]):
        tok, j = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            y[tok, j] = swiglu(x[tok], w13[e], w2[e])
    out = (y * weights.unsqueeze(-1)).sum(1)
    if shared is not None:
        out = out + shared(x)
    return out
