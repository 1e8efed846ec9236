"""The published greedy EPLB baseline (DeepSeek's open ``eplb.py``), written from its description.

* replication: each extra replica goes to the expert with the largest load per replica;
* packing: heaviest item first, into the lightest pack that still has room (every pack gets
  exactly items/packs items);
* hierarchical: group loads packed onto nodes, replicas made within each node
  (R/N slots per node), then physical experts packed onto the node's GPUs.

``greedy_plan`` is vectorised across layers. Two speed baselines run the same algorithm as per-layer
Python loops: ``greedy_torch_loops`` over torch tensors with tensor scalar indexing (the style of
DeepSeek's published ``eplb.py``, the issue's "greedy baseline written as per-layer Python loops"),
and ``greedy_pylist`` over plain Python lists (faster; ``greedy_reference`` is its old name). All three
give identical placements (exactly so when sums are exact, e.g. integer token counts).
"""
from __future__ import annotations

import numpy as np
import torch

from .packing import greedy_packing
from .pipeline import run_pipeline
from .replication import replicate_greedy


def greedy_plan(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Greedy placement, vectorised. ``weight [L, E]`` float64 -> ``phy2log [L, R]`` int64.

    Call with ``num_groups = num_nodes = 1`` for the global policy.
    """
    return run_pipeline(weight, num_replicas, num_groups, num_nodes, num_gpus,
                        greedy_packing, replicate_greedy, greedy_packing)


def _pack_loop(items: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    """Greedy balanced packing of one row: returns (pack, rank) lists."""
    k = len(items) // num_packs
    order = sorted(range(len(items)), key=lambda i: -items[i])
    loads = [0.0] * num_packs
    fill = [0] * num_packs
    pack = [0] * len(items)
    rank = [0] * len(items)
    for i in order:
        p = min((q for q in range(num_packs) if fill[q] < k), key=lambda q: loads[q])
        pack[i], rank[i] = p, fill[p]
        loads[p] += items[i]
        fill[p] += 1
    return pack, rank


def _replicate_loop(w: list[float], num_slots: int) -> list[int]:
    """Greedy replica counts of one row."""
    counts = [1] * len(w)
    for _ in range(num_slots - len(w)):
        e = max(range(len(w)), key=lambda i: w[i] / counts[i])
        counts[e] += 1
    return counts


def greedy_pylist(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Greedy placement as per-layer Python loops over lists (speed baseline). Same inputs/outputs as :func:`greedy_plan`."""
    w_all = np.asarray(weight, dtype=np.float64)
    L, E = w_all.shape
    R, G, N, P = num_replicas, num_groups, num_nodes, num_gpus
    gs, n, m, ppn, k = E // G, E // N, R // N, P // N, R // P
    out = np.empty((L, R), dtype=np.int64)
    for layer in range(L):
        w = w_all[layer].tolist()
        if N > 1:
            group_load = [sum(w[g * gs:(g + 1) * gs]) for g in range(G)]
            node, rank = _pack_loop(group_load, N)
        else:
            node, rank = [0] * G, list(range(G))
        mlog2log = [0] * E
        for g in range(G):
            for j in range(gs):
                mlog2log[(node[g] * (G // N) + rank[g]) * gs + j] = g * gs + j
        for nd in range(N):
            experts = mlog2log[nd * n:(nd + 1) * n]
            wn = [w[e] for e in experts]
            counts = _replicate_loop(wn, m)
            item_expert = [e for e in range(n) for _ in range(counts[e])]
            items = [wn[e] / counts[e] for e in item_expert]
            pack, rank_in = _pack_loop(items, ppn)
            for i, e in enumerate(item_expert):
                out[layer, nd * m + pack[i] * k + rank_in[i]] = experts[e]
    return torch.from_numpy(out)


greedy_reference = greedy_pylist  # the old name


def _pack_torch(items: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy balanced packing of one row, item by item over torch scalars: ``[m]`` -> ``(pack [m], rank [m])``."""
    m = items.numel()
    per_pack = m // num_packs
    pack = torch.full((m,), -1, dtype=torch.int64)
    rank = torch.full((m,), -1, dtype=torch.int64)
    pack_weights = [0] * num_packs  # become 0-d tensors
    pack_items = [0] * num_packs
    for item in items.sort(descending=True, stable=True).indices:
        p = min((q for q in range(num_packs) if pack_items[q] < per_pack), key=pack_weights.__getitem__)
        pack[item] = p
        rank[item] = pack_items[p]
        pack_weights[p] += items[item]
        pack_items[p] += 1
    return pack, rank


def greedy_torch_loops(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Greedy placement as per-layer Python loops over torch tensors (tensor scalar indexing), the
    style of DeepSeek's published ``eplb.py``; written from the algorithm's description. The speed
    baseline of the issue. Same inputs/outputs as :func:`greedy_plan`."""
    w_all = torch.as_tensor(weight, dtype=torch.float64)
    L, E = w_all.shape
    R, G, N, P = num_replicas, num_groups, num_nodes, num_gpus
    gs, n, m, ppn, k = E // G, E // N, R // N, P // N, R // P
    phy2log = torch.empty(L, R, dtype=torch.int64)
    for layer in range(L):
        w = w_all[layer]  # [E]
        if N > 1:
            node, rank = _pack_torch(w.view(G, gs).sum(-1), N)  # [G] each
        else:
            node, rank = torch.zeros(G, dtype=torch.int64), torch.arange(G)
        mlog2log = torch.empty(E, dtype=torch.int64)
        for g in range(G):
            base = (node[g] * (G // N) + rank[g]) * gs
            for j in range(gs):
                mlog2log[base + j] = g * gs + j
        for nd in range(N):
            experts = mlog2log[nd * n:(nd + 1) * n]  # [n]
            wn = w[experts]
            cnt = torch.ones(n, dtype=torch.int64)
            for _ in range(m - n):
                cnt[(wn / cnt).argmax()] += 1
            item_expert = torch.repeat_interleave(torch.arange(n), cnt)  # [m]
            items = wn[item_expert] / cnt[item_expert]
            pack, rank_in = _pack_torch(items, ppn)
            for i in range(m):
                phy2log[layer, nd * m + pack[i] * k + rank_in[i]] = experts[item_expert[i]]
    return phy2log
