"""The three-stage hierarchical planner shared by every policy.

1. expert groups -> nodes (``group_packer``), 2. replica counts per node (``replicator``),
3. replicas -> GPUs of the node (``item_packer``). The global policy is the same pipeline with one
node and one group. Policies differ only in the stage functions they plug in.
"""
from __future__ import annotations

from typing import Callable

import torch

from .layout import items_from_counts, node_major_order, slots_from_packing

Packer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
Replicator = Callable[[torch.Tensor, int], torch.Tensor]


def node_stage(weight: torch.Tensor, num_groups: int, num_nodes: int, group_packer: Packer) -> torch.Tensor:
    """Assign groups to nodes. ``weight [L, E]`` -> ``mlog2log [L, E]`` (node-major order)."""
    L, E = weight.shape
    gs = E // num_groups
    group_load = weight.view(L, num_groups, gs).sum(-1)  # [L, G]
    if num_nodes == 1:
        node = torch.zeros(L, num_groups, dtype=torch.int64)
        rank = torch.arange(num_groups).expand(L, -1).contiguous()
    else:
        node, rank = group_packer(group_load, num_nodes)  # [L, G] each
    return node_major_order(node, rank, gs)


def node_weights(weight: torch.Tensor, mlog2log: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Loads of each node's experts: ``[L, E]`` -> ``[L * num_nodes, E / num_nodes]``."""
    L, E = weight.shape
    return weight.gather(1, mlog2log).view(L * num_nodes, E // num_nodes)


def replica_items(w_node: torch.Tensor, num_slots: int, replicator: Replicator):
    """Replicate within each node. ``w_node [B, n]`` -> ``(item_expert [B, m], item_load [B, m])``.

    ``item_load`` is the per-replica load ``load / count`` (tokens spread evenly over replicas).
    """
    counts = replicator(w_node, num_slots)  # [B, n]
    item_expert = items_from_counts(counts, num_slots)  # [B, m]
    item_load = (w_node / counts).gather(1, item_expert)  # [B, m]
    return item_expert, item_load


def assemble(mlog2log: torch.Tensor, item_expert: torch.Tensor, pack: torch.Tensor, rank: torch.Tensor,
             num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Turn per-node packings into ``phy2log [L, R]`` (GPU g owns slots g*R/P .. (g+1)*R/P-1)."""
    L, E = mlog2log.shape
    B, m = item_expert.shape
    R = m * num_nodes
    k = R // num_gpus
    slot_local = slots_from_packing(item_expert, pack, rank, k)  # [L*N, m]
    offset = (torch.arange(num_nodes) * (E // num_nodes)).view(1, num_nodes, 1)
    phy2mlog = (slot_local.view(L, num_nodes, m) + offset).view(L, R)  # [L, R]
    return mlog2log.gather(1, phy2mlog)


def run_pipeline(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                 group_packer: Packer, replicator: Replicator, item_packer: Packer) -> torch.Tensor:
    """Plan with the given stages. ``weight [L, E]`` float64 -> ``phy2log [L, R]`` int64."""
    mlog2log = node_stage(weight, num_groups, num_nodes, group_packer)
    w_node = node_weights(weight, mlog2log, num_nodes)
    item_expert, item_load = replica_items(w_node, num_replicas // num_nodes, replicator)
    pack, rank = item_packer(item_load, num_gpus // num_nodes)
    return assemble(mlog2log, item_expert, pack, rank, num_nodes, num_gpus)
