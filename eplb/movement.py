"""Minimal movement: relabel a plan's GPUs and slots so that as many expert weights as possible stay put.

The plan fixes a multiset of experts per GPU. Which physical GPU gets which multiset, and which slot
of the GPU holds which expert, does not change any GPU's load; choosing them to overlap the current
placement saves weight transfers.
"""
from __future__ import annotations

import numpy as np
import torch


def _gpu_counts(phy2log: torch.Tensor, num_gpus: int, num_experts: int) -> torch.Tensor:
    """``[L, R]`` -> ``[L, P, E]`` int32 copies of each expert on each GPU."""
    L, R = phy2log.shape
    out = torch.zeros(L, num_gpus, num_experts, dtype=torch.int32)
    return out.scatter_add_(2, phy2log.view(L, num_gpus, R // num_gpus), torch.ones(L, num_gpus, R // num_gpus, dtype=torch.int32))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multiset overlap of every pair of bins: ``a [L, X, E], b [L, Y, E]`` -> ``[L, X, Y]``."""
    return torch.stack([torch.minimum(a[:, i : i + 1], b).sum(-1) for i in range(a.shape[1])], dim=1)


def _keep_slots(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Order each GPU's experts so that experts already in a slot stay there.

    ``new, old [L, P, k]`` (new: the multiset per GPU, any order) -> ``[L, P, k]`` reordered new.
    Loops over slot positions only.
    """
    k = new.shape[-1]
    eq = old.unsqueeze(-1) == new.unsqueeze(-2)  # [L, P, k(old slot), k(new item)]
    used = torch.zeros_like(new, dtype=torch.bool)  # [L, P, k] new item already placed
    src = torch.full_like(new, -1)  # [L, P, k] new item kept in old slot j, -1 = free slot
    for j in range(k):
        cand = eq[..., j, :] & ~used  # [L, P, k]
        has = cand.any(-1)
        i = cand.to(torch.int8).argmax(-1)  # first matching unused item
        src[..., j] = torch.where(has, i, -1)
        used.scatter_(-1, i.unsqueeze(-1), has.unsqueeze(-1) | used.gather(-1, i.unsqueeze(-1)))
    # fill free slots with unused items, both in increasing order
    free_rank = (src < 0).cumsum(-1) - 1  # [L, P, k] rank among free slots
    unused_order = torch.sort((used.to(torch.int64) * k) + torch.arange(k), dim=-1).indices  # unused first
    fill = unused_order.gather(-1, free_rank.clamp_min(0))
    src = torch.where(src < 0, fill, src)
    return new.gather(-1, src)


def minimize_movement(phy2log: torch.Tensor, previous: torch.Tensor, num_gpus: int, num_nodes: int = 1) -> torch.Tensor:
    """Relabel ``phy2log [L, R]`` to stay close to ``previous [L, R]``; returns the relabelled ``[L, R]``.

    1. nodes (when ``num_nodes > 1``, hierarchical plans): new nodes are matched to current nodes by
       maximum expert overlap (``scipy.optimize.linear_sum_assignment``), keeping each node's GPUs together;
    2. GPUs: within each matched node pair (or among all GPUs for the global policy), new GPUs are
       matched to current GPUs by maximum expert overlap;
    3. slots: an expert already in a slot of its GPU stays in that slot.

    Every GPU keeps its multiset of experts, so per-GPU loads (and balancedness) are unchanged. Each
    layer keeps whichever of the relabelled and the original plan moves fewer experts, so this never
    moves more than not relabelling. The assignments are solved per layer (small ``P x P`` problems).
    """
    # imported here: scipy.optimize costs 0.7 s of start-up in every rank, most of which never relabel
    from scipy.optimize import linear_sum_assignment

    L, R = phy2log.shape
    E = int(max(int(phy2log.max()), int(previous.max()))) + 1
    P, N = num_gpus, num_nodes
    ppn, k = P // N, R // P
    new_c = _gpu_counts(phy2log, P, E)  # [L, P, E]
    old_c = _gpu_counts(previous, P, E)  # [L, P, E]
    gpu_perm = np.empty((L, P), dtype=np.int64)  # gpu_perm[l, old gpu] = new gpu moved there
    if N > 1:
        node_ov = _overlap(new_c.view(L, N, ppn, E).sum(2), old_c.view(L, N, ppn, E).sum(2)).numpy()  # [L, N, N]
    else:
        node_ov = None
    gpu_ov = _overlap(new_c, old_c).numpy()  # [L, P, P]
    for layer in range(L):
        if N > 1:
            rows, cols = linear_sum_assignment(node_ov[layer], maximize=True)
        else:
            rows, cols = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        for a, b in zip(rows, cols):  # new node a -> old node b
            sub = gpu_ov[layer, a * ppn:(a + 1) * ppn, b * ppn:(b + 1) * ppn]
            r2, c2 = linear_sum_assignment(sub, maximize=True)
            gpu_perm[layer, b * ppn + c2] = a * ppn + r2
    perm = torch.from_numpy(gpu_perm)  # [L, P]
    moved = phy2log.view(L, P, k).gather(1, perm.unsqueeze(-1).expand(L, P, k))  # [L, P, k]
    out = _keep_slots(moved, previous.view(L, P, k)).reshape(L, R)
    keep_new = (out != previous).sum(-1) <= (phy2log != previous).sum(-1)  # [L]
    return torch.where(keep_new.unsqueeze(-1), out, phy2log)
