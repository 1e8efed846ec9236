"""Balanced packing (torch, used by the greedy policy): put ``m`` items into ``P`` packs of exactly
``m / P`` items each, batched over rows. The default policy's packers are in :mod:`eplb.kernels`.

All functions take ``items [B, m]`` (float loads; rows are independent problems, e.g. layers or
(layer, node) pairs) and return ``pack [B, m]`` (int64 pack of each item) and ``rank [B, m]``
(position of the item inside its pack, 0 .. m/P-1). Loops run over items or iterations, never rows.
"""
from __future__ import annotations

import torch

from .layout import rank_within_pack


def pack_loads(items: torch.Tensor, pack: torch.Tensor, num_packs: int) -> torch.Tensor:
    """Sum of item loads per pack: ``items, pack [B, m]`` -> ``[B, num_packs]``."""
    out = torch.zeros(items.shape[0], num_packs, dtype=items.dtype)
    return out.scatter_add_(1, pack, items)


def greedy_packing(items: torch.Tensor, num_packs: int):
    """Longest-processing-time packing: heaviest item first, into the lightest pack that still has room.

    ``items [B, m]`` -> ``(pack [B, m], rank [B, m])``; ``rank`` is the insertion order in the pack.
    Ties: equal items keep index order; equal packs go to the lowest pack id.
    """
    B, m = items.shape
    k = m // num_packs
    order = torch.sort(items, dim=-1, descending=True, stable=True).indices  # [B, m]
    srt = items.gather(1, order)  # [B, m] heaviest first
    loads = torch.zeros(B, num_packs, dtype=items.dtype)  # [B, P]; full packs are set to +inf
    fill = torch.zeros(B, num_packs, dtype=torch.int64)  # [B, P]
    ones = torch.ones(B, 1, dtype=torch.int64)
    pack_sorted = torch.empty(B, m, dtype=torch.int64)  # [B, m] pack of the i-th heaviest item
    for i in range(m):
        p = loads.argmin(-1, keepdim=True)  # [B, 1] first lightest pack with room
        pack_sorted[:, i : i + 1] = p
        loads.scatter_add_(1, p, srt[:, i : i + 1])
        fill.scatter_add_(1, p, ones)
        loads.masked_fill_(fill == k, float("inf"))
    pack = torch.empty_like(pack_sorted).scatter_(1, order, pack_sorted)
    rank = torch.empty_like(pack_sorted).scatter_(1, order, rank_within_pack(pack_sorted, num_packs))
    return pack, rank
