"""A differentiable, single-process MoE feed-forward for training the built-in MoE-DiT.

`moe_ep.layer.MoELayer` is inference-only (no autograd, expert-parallel dispatch). For training,
`swap_in(model)` replaces every block's MoELayer by a `TrainMoE` that holds the SAME submodules
(`router.gate.weight` [E, H], `experts.w13` [S, H, 2F], `experts.w2` [S, F, H], `shared.w13`/`shared.w2`),
so `model.state_dict()` keeps moe-ep's names and `swap_out(model)` puts the (now trained)
MoELayers back: the checkpoint saved from it loads in the inference runtime unchanged.

Routing is moe_ep/router.py's token-choice rule, through the router's own `scores(x)` and
`top_k(scores)` (softmax or sigmoid, group limiting, top-k, renormalise, route scale); the test
compares this layer with MoELayer at EP = 1.
Experts run as one padded batched matmul: copies are sorted by expert into [E, C, H]
(C = the largest expert load of the batch), which autograd and bf16 autocast handle.
Requires EP = 1 with the contiguous placement (slot e holds expert e).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TrainMoE(nn.Module):
    """Training forward over an MoELayer's own parameters. `aux_loss` (Switch-Transformer
    load-balancing term, E * sum_e f_e * P_e, 1.0 when balanced) and `counts` [E] (copies
    per expert) of the last forward are kept for the trainer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        cfg = layer.cfg
        if getattr(cfg, "routing", "token_choice") != "token_choice":
            raise ValueError(f"model.moe.routing = {cfg.routing!r}: training supports 'token_choice' only")
        if layer.num_slots != cfg.num_experts or layer.ctx.ep_size != 1:
            raise ValueError("training needs EP = 1 and no redundant experts (slot e holds expert e)")
        self.cfg = cfg
        self.router, self.experts, self.shared = layer.router, layer.experts, layer.shared
        # the trainer reads w13 as [gate | up]: a path that stores it interleaved is left for
        # the training and put back by swap_out
        self.inference_backend = layer.experts.backend
        if layer.experts.paired:
            layer.experts.backend = "triton"
        self.aux_loss = torch.zeros(())
        self.counts = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, ids [T, k] int64, scores [T, E]): the runtime
        router's own `scores` and `top_k` (moe_ep/router.py), outside autocast so the scores keep
        the router's dtype rule; the weights are differentiable in the gate."""
        with torch.autocast(x.device.type, enabled=False):
            scores = self.router.scores(x)                                                   # [T, E]
        weights, ids = self.router.top_k(scores)                                             # [T, k] each
        return weights, ids, scores.float()

    def experts_forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, k] -> expert outputs [T, k, H] (SwiGLU of expert ids[t, j] on x[t])."""
        T, k = ids.shape
        E = self.cfg.num_experts
        flat = ids.reshape(-1)                                                   # [T*k]
        order = flat.argsort(stable=True)                                        # copies grouped by expert
        eid = flat[order]                                                        # [T*k]
        counts = torch.bincount(flat, minlength=E)                               # [E]
        starts = counts.cumsum(0) - counts                                       # [E]
        pos = torch.arange(T * k, device=x.device) - starts[eid]                 # [T*k] row within expert
        C = int(counts.max())
        rows = x[order // k]                                                     # [T*k, H]
        buf = rows.new_zeros(E, C, x.shape[1])                                   # [E, C, H]
        buf = buf.index_put((eid, pos), rows)
        w13, w2 = self.experts.w13, self.experts.w2                             # [E, H, 2F], [E, F, H]
        gate, up = torch.bmm(buf, w13).chunk(2, -1)                               # [E, C, F] each
        y = torch.bmm(F.silu(gate) * up, w2)                                     # [E, C, H]
        out = y[eid, pos]                                                        # [T*k, H], sorted order
        unsorted = torch.empty_like(out).index_copy(0, order, out)              # [T*k, H], copy order
        self.counts = counts.detach()
        return unsorted.view(T, k, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]; sets `aux_loss` and `counts`."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                             # [T, H]
        weights, ids, scores = self.route(x)
        y = self.experts_forward(x, ids)                                         # [T, k, H]
        out = (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)                     # [T, H]
        if self.shared is not None:
            out = out + self.shared(x)
        E = self.cfg.num_experts
        frac = self.counts.float() / max(1, ids.numel())                        # [E] f_e, no gradient
        self.aux_loss = E * (frac * scores.mean(0)).sum()
        return out.view(shape).to(x.dtype)


def swap_in(model: nn.Module) -> list[TrainMoE]:
    """Replace every MoELayer feed-forward of `model.blocks` by a TrainMoE over the same
    parameters (made trainable); returns them in MoE-layer order."""
    from ..layer import MoELayer

    out = []
    for block in model.blocks:
        if isinstance(block.ffn, MoELayer):
            train = TrainMoE(block.ffn)
            train._inference_layer = [block.ffn]   # a list: not registered as a submodule
            block.ffn = train
            out.append(train)
    for p in model.parameters():
        p.requires_grad_(True)
    return out


def swap_out(model: nn.Module) -> None:
    """Put the inference MoELayers back (their parameters are the trained ones)."""
    for block in model.blocks:
        if isinstance(block.ffn, TrainMoE):
            train, block.ffn = block.ffn, block.ffn._inference_layer[0]
            block.ffn.experts.backend = train.inference_backend
    for p in model.parameters():
        p.requires_grad_(False)
