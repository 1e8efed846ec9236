"""The default policy: a small portfolio of replica-count rules and packings, best kept per layer.

Stages (see :mod:`eplb.pipeline`):

1. groups -> nodes (hierarchical, several groups per node): greedy packing of the group loads and
   differencing + swap refinement; both are planned through, each layer keeps the better plan.
2. replica counts per node: greedy's rule (minimal largest per-replica load) and divisor rules
   capped at the number of GPUs of the node (see :func:`eplb.replication.replicate_divisor`):
   a hot expert never gets more replicas than GPUs to spread them over, and ``delta`` trades
   replicas of hot experts for second replicas of warm ones.
3. replicas -> GPUs: greedy or differencing (Karmarkar-Karp) packing, polished by swaps between the
   heaviest GPU and the lightest ones, evaluated for all (layer, node) rows at once.

Each (layer, node) row keeps the candidate with the lowest heaviest GPU. Candidate 0 is greedy's
own replica counts and packing, and swaps never raise a maximum, so the result is never worse than
greedy on the planning loads, layer by layer.
"""
from __future__ import annotations

import torch

from .layout import items_from_counts
from .metrics import gpu_load
from .packing import differencing_packing, greedy_packing, pack_loads, refine_swaps
from .pipeline import assemble, node_stage, node_weights
from .replication import replicate_divisor

# (cap replicas at GPUs per node?, delta of the divisor rule, packing) -- candidate 0 is greedy's.
COUNT_RULES = ((False, 0.0, "greedy"), (True, -0.5, "differencing"), (True, 0.0, "differencing"), (True, 1.0, "differencing"))
_PACKERS = {"greedy": greedy_packing, "differencing": differencing_packing}


def refined_packing(items: torch.Tensor, num_packs: int, packer: str = "differencing", partners: int | None = 16):
    """Pack with ``packer`` ("greedy" | "differencing") then refine by swaps. ``[B, m]`` -> ``(pack, rank)``."""
    pack, _ = _PACKERS[packer](items, num_packs)
    return refine_swaps(items, pack, num_packs, partners=partners)


def plan_nodes(w_node: torch.Tensor, num_slots: int, gpus_per_node: int, rules=COUNT_RULES, partners: int | None = 16):
    """Replicate and pack every (layer, node) row, keeping per row the rule with the lowest heaviest GPU.

    ``w_node [B, n]`` node-local loads -> ``(item_expert [B, m], pack [B, m], rank [B, m], top [B])``
    with ``m = num_slots``; ``top`` is the heaviest GPU load of the row.
    """
    best = None
    for cap, delta, packer in rules:
        counts = replicate_divisor(w_node, num_slots, cap=gpus_per_node if cap else None, delta=delta)  # [B, n]
        item_expert = items_from_counts(counts, num_slots)  # [B, m]
        item_load = (w_node / counts).gather(1, item_expert)  # [B, m]
        pack, rank = refined_packing(item_load, gpus_per_node, packer, partners)
        top = pack_loads(item_load, pack, gpus_per_node).max(-1).values  # [B]
        if best is None:
            best = [item_expert, pack, rank, top]
            continue
        better = top < best[3] * (1 - 1e-12)  # [B]
        b = better.unsqueeze(-1)
        best = [torch.where(b, item_expert, best[0]), torch.where(b, pack, best[1]),
                torch.where(b, rank, best[2]), torch.where(better, top, best[3])]
    return tuple(best)


def default_plan(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                 rules=COUNT_RULES, partners: int | None = 16) -> torch.Tensor:
    """Default placement. ``weight [L, E]`` float64 -> ``phy2log [L, R]`` int64.

    Call with ``num_groups = num_nodes = 1`` for the global policy. ``rules``: the replica-count
    candidates (see :data:`COUNT_RULES`; keep greedy's first to keep the never-worse guarantee);
    ``partners``: how many of the lightest GPUs the swap search pairs with the heaviest (None: all).
    """
    group_packers = [greedy_packing]
    if num_nodes > 1 and num_groups // num_nodes > 1:
        group_packers.append(lambda x, p: refined_packing(x, p, "differencing", None))
    best, best_top = None, None
    for group_packer in group_packers:
        mlog2log = node_stage(weight, num_groups, num_nodes, group_packer)  # [L, E]
        w_node = node_weights(weight, mlog2log, num_nodes)  # [L*N, E/N]
        item_expert, pack, rank, _ = plan_nodes(w_node, num_replicas // num_nodes, num_gpus // num_nodes, rules, partners)
        phy2log = assemble(mlog2log, item_expert, pack, rank, num_nodes, num_gpus)  # [L, R]
        if len(group_packers) == 1:
            return phy2log
        top = gpu_load(weight, phy2log, num_gpus).max(-1).values  # [L]
        if best is None:
            best, best_top = phy2log, top
            continue
        better = top < best_top * (1 - 1e-12)
        best = torch.where(better.unsqueeze(-1), phy2log, best)
        best_top = torch.where(better, top, best_top)
    return best
