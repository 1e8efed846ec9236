"""Index plumbing between logical experts, node-major order, replicas and physical slots.

Vocabulary (see docs/design.md): ``phy2log [L, R]`` logical id per physical slot,
``log2phy [L, E, max_replicas]`` slots of each logical expert (-1 padded), ``logcnt [L, E]``.
"node-major" ("mlog") order lists the experts of node 0 first, then node 1, ...
"""
from __future__ import annotations

import torch


def node_major_order(node_of_group: torch.Tensor, rank_in_node: torch.Tensor, group_size: int) -> torch.Tensor:
    """Map node-major positions to logical experts.

    Inputs: ``node_of_group [L, G]`` node of each expert group, ``rank_in_node [L, G]`` position of
    the group among its node's groups (0 .. G/N-1), ``group_size`` experts per group.
    Output: ``mlog2log [L, E]``: node-major position -> logical expert id (a permutation per layer).
    """
    L, G = node_of_group.shape
    groups_per_node = int(rank_in_node.max()) + 1 if rank_in_node.numel() else 1
    base = (node_of_group * groups_per_node + rank_in_node) * group_size  # [L, G]
    log2mlog = (base.unsqueeze(-1) + torch.arange(group_size)).reshape(L, G * group_size)  # [L, E]
    mlog2log = torch.empty_like(log2mlog)
    mlog2log.scatter_(1, log2mlog, torch.arange(G * group_size).expand(L, -1))
    return mlog2log


def items_from_counts(counts: torch.Tensor, num_items: int) -> torch.Tensor:
    """Expand replica counts into a list of replicas.

    Input: ``counts [B, n]`` (int64, each row sums to ``num_items``).
    Output: ``item_expert [B, num_items]``: the expert of each replica, experts in increasing order.
    """
    cum = counts.cumsum(-1)  # [B, n]
    pos = torch.arange(num_items).expand(counts.shape[0], -1).contiguous()  # [B, m]
    return torch.searchsorted(cum, pos, right=True)


def slots_from_packing(item_expert: torch.Tensor, pack: torch.Tensor, rank: torch.Tensor, items_per_pack: int) -> torch.Tensor:
    """Lay packed items into slots: pack ``p`` owns slots ``p*k .. p*k+k-1``.

    Inputs: ``item_expert, pack, rank`` all ``[B, m]``; ``rank`` is the position inside the pack.
    Output: ``slot_expert [B, m]``.
    """
    pos = pack * items_per_pack + rank  # [B, m]
    return torch.empty_like(item_expert).scatter_(1, pos, item_expert)


def rank_within_pack(pack: torch.Tensor, num_packs: int) -> torch.Tensor:
    """Position of each item among the items of its pack (in item order). ``pack [B, m]`` -> ``[B, m]``."""
    B, m = pack.shape
    order = torch.sort(pack * m + torch.arange(m), dim=-1).indices  # [B, m] items grouped by pack
    sizes = torch.zeros(B, num_packs, dtype=torch.int64).scatter_add_(1, pack, torch.ones_like(pack))
    start = (sizes.cumsum(-1) - sizes).gather(1, pack.gather(1, order))  # [B, m]
    return torch.empty_like(pack).scatter_(1, order, torch.arange(m) - start)


def log2phy_from_phy2log(phy2log: torch.Tensor, num_logical: int, max_replicas: int | None = None):
    """Derive ``(log2phy [L, E, max_replicas] -1 padded, logcnt [L, E])`` from ``phy2log [L, R]``.

    Replicas of an expert are listed in increasing slot order. ``max_replicas`` defaults to
    ``R - E + 1`` (DeepSeek's ``num_redundant_experts + 1``).
    """
    L, R = phy2log.shape
    if max_replicas is None:
        max_replicas = R - num_logical + 1
    logcnt = torch.zeros(L, num_logical, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    sorted_log, slot = torch.sort(phy2log, dim=1, stable=True)  # [L, R]
    first = (logcnt.cumsum(1) - logcnt).gather(1, sorted_log)  # [L, R] first sorted position of the expert
    rank = torch.arange(R).expand(L, -1) - first  # [L, R]
    log2phy = torch.full((L, num_logical * max_replicas), -1, dtype=torch.int64)
    log2phy.scatter_(1, sorted_log * max_replicas + rank, slot)
    return log2phy.view(L, num_logical, max_replicas), logcnt
