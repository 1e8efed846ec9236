"""Balanced packing: put ``m`` items into ``P`` packs of exactly ``m / P`` items each, batched over rows.

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


def differencing_packing(items: torch.Tensor, num_packs: int):
    """Balanced largest-differencing (Karmarkar-Karp) packing with exactly ``m / P`` items per pack.

    Items sorted by load are cut into ``k = m / P`` rounds of ``P`` items: each round is a partial
    solution with one item per pack. Repeatedly the two partial solutions with the largest spread
    (max - min pack sum) are merged, heaviest pack of one with lightest pack of the other, so each
    merged pack gains exactly one item per round. ``items [B, m]`` -> ``(pack [B, m], rank [B, m])``.
    """
    B, m = items.shape
    P = num_packs
    k = m // P
    order = torch.sort(items, dim=-1, descending=True, stable=True).indices  # [B, m]
    srt = items.gather(1, order)  # [B, m] sorted descending
    sums = srt.view(B, k, P).clone()  # [B, k, P] pack sums of each partial solution
    part = (torch.arange(m) // P).expand(B, -1).clone()  # [B, m] partial of each sorted item
    sub = (torch.arange(m) % P).expand(B, -1).clone()  # [B, m] pack inside its partial
    alive = torch.ones(B, k, dtype=torch.bool)
    rows = torch.arange(B)
    ninf = torch.tensor(float("-inf"), dtype=items.dtype)
    for _ in range(k - 1):
        spread = torch.where(alive, sums.max(-1).values - sums.min(-1).values, ninf)  # [B, k]
        top2 = spread.topk(2, dim=-1).indices  # [B, 2]
        a, b = top2[:, 0], top2[:, 1]
        sa, sb = sums[rows, a], sums[rows, b]  # [B, P]
        desc_a = torch.sort(sa, dim=-1, descending=True, stable=True).indices  # [B, P]
        asc_b = torch.sort(sb, dim=-1, stable=True).indices  # [B, P]
        target = torch.empty_like(asc_b).scatter_(1, asc_b, desc_a)  # [B, P] pack of a receiving b's pack j
        sums[rows, a] = sa.scatter_add(1, target, sb)
        sums[rows, b] = 0.0
        alive[rows, b] = False
        in_b = part == b.unsqueeze(1)  # [B, m]
        sub = torch.where(in_b, target.gather(1, sub), sub)
        part = torch.where(in_b, a.unsqueeze(1), part)
    pack = torch.empty_like(sub).scatter_(1, order, sub)
    return pack, rank_within_pack(pack, P)


def refine_swaps(items: torch.Tensor, pack: torch.Tensor, num_packs: int, max_iters: int | None = None,
                 partners: int | None = 16):
    """Local search: swap one item of the heaviest pack with one item of another pack.

    Each iteration evaluates, for every row at once, all swaps between the heaviest pack and each
    of the ``partners`` lightest packs (all packs when None; a ``[B, partners, k, k]`` tensor) and applies the one giving the smallest new maximum of the
    two packs, if it is strictly below the current maximum. Stops when no row improves.
    ``items, pack [B, m]`` -> ``(pack [B, m], rank [B, m])``; pack sizes are preserved and no row's
    maximum pack load ever increases.
    """
    B, m = items.shape
    P = num_packs
    k = m // P
    if P == 1 or k == 0:
        return pack, rank_within_pack(pack, P)
    if max_iters is None:
        max_iters = 4 * P + 16
    idx = torch.sort(pack * m + torch.arange(m), dim=-1, stable=True).indices.view(B, P, k)  # [B, P, k] item ids
    W = items.gather(1, idx.view(B, m)).view(B, P, k)  # [B, P, k] item loads
    flat_idx, flat_W = idx.view(B, m), W.view(B, m)
    inf = torch.tensor(float("inf"), dtype=items.dtype)
    active = torch.arange(B)
    t = P if partners is None else min(P, partners)
    for _ in range(max_iters):
        Wa = W[active]  # [A, P, k]
        load = Wa.sum(-1)  # [A, P]
        top, h = load.max(-1)  # [A]
        Wh = Wa[torch.arange(len(active)), h]  # [A, k]
        if t < P:
            light, cand = load.topk(t, dim=-1, largest=False)  # [A, t]
            Wc = Wa.gather(1, cand.unsqueeze(-1).expand(-1, -1, k))  # [A, t, k]
        else:
            light, cand, Wc = load, None, Wa
        delta = Wh[:, None, :, None] - Wc[:, :, None, :]  # [A, t, k, k]
        new = torch.maximum(top[:, None, None, None] - delta, light[:, :, None, None] + delta)
        new = torch.where(delta > 0, new, inf)
        best, where = new.view(len(active), -1).min(-1)  # [A]
        ok = best < top * (1 - 1e-12)
        if not bool(ok.any()):
            break
        r, h, where = active[ok], h[ok], where[ok]
        g, i, j = where // (k * k), (where // k) % k, where % k
        if cand is not None:
            g = cand[ok].gather(1, g.unsqueeze(1)).squeeze(1)
        a_pos, b_pos = h * k + i, g * k + j  # flat positions of the two items
        wa, wb = flat_W[r, a_pos].clone(), flat_W[r, b_pos].clone()
        ia, ib = flat_idx[r, a_pos].clone(), flat_idx[r, b_pos].clone()
        flat_W[r, a_pos], flat_W[r, b_pos] = wb, wa
        flat_idx[r, a_pos], flat_idx[r, b_pos] = ib, ia
        active = r
    new_pack = torch.empty_like(pack).scatter_(1, flat_idx, (torch.arange(m) // k).expand(B, -1).contiguous())
    rank = torch.empty_like(pack).scatter_(1, flat_idx, (torch.arange(m) % k).expand(B, -1).contiguous())
    return new_pack, rank
