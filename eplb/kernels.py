"""NumPy kernels of the default policy, batched over rows (a row = one (candidate, layer, node) problem).

The default policy runs a few hundred small array operations per plan; NumPy's per-call overhead is
several times lower than torch's on arrays of this size, so the hot loops live here. Loops run over
replicas, items, merge rounds or refinement iterations, never over rows.

Shapes: ``w [B, n]`` node-local expert loads, ``items [B, m]`` per-replica loads; a packing is a
*layout* ``idx [B, P, k]``: the item ids held by each of the ``P`` packs (``k = m / P`` each).

Performance notes (measured): NumPy's ``min/max/sum/all`` along a short last axis cost ~10x more than
``argmin/argmax`` + a flat take, so the kernels reduce with ``argmax``, matmul or incremental
updates, and index through flattened arrays (``flat[row * width + col]``).
"""
from __future__ import annotations

import numpy as np


def _row_max(x: np.ndarray) -> np.ndarray:
    """``x [B, n]`` -> ``[B]`` row maxima (argmax + take; faster than ``x.max(1)`` for short rows)."""
    B, n = x.shape
    return x.ravel()[np.arange(B) * n + x.argmax(1)]


def _row_min(x: np.ndarray) -> np.ndarray:
    B, n = x.shape
    return x.ravel()[np.arange(B) * n + x.argmin(1)]


def _row_sum(x: np.ndarray) -> np.ndarray:
    """``x [..., n]`` float -> ``[...]`` sums over the last axis (a matmul)."""
    return x @ np.ones(x.shape[-1])


def replicate_rows(w: np.ndarray, num_slots: int, cap: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Divisor-method replica counts, one rule per row (see :func:`eplb.replication.replicate_divisor`).

    ``w [B, n]`` float64, ``cap [B]`` int (``>= num_slots`` means uncapped), ``delta [B]`` float ->
    ``counts [B, n]`` int64 (>= 1, rows sum to ``num_slots``). Each extra slot goes to the open expert
    with the largest ``w / (count + delta)`` (first on ties); when every expert of a row is capped
    the cap is ignored. ``delta = 0`` with no cap is greedy's rule, with the same ties.
    """
    B, n = w.shape
    counts = np.ones((B, n), dtype=np.int64)
    cflat, wflat = counts.ravel(), w.ravel()
    score = w / (1.0 + delta)[:, None]  # [B, n]
    sflat = score.ravel()
    off = np.arange(B) * n
    # experts at their cap get score -inf in s_eff, until every expert of the row is capped
    # (counts stay <= cap until then, i.e. until n + it >= n * cap); then the row uses the plain score
    open_all = n >= n * cap  # [B]
    s_eff = np.where(open_all[:, None] | (cap[:, None] > 1), score, -np.inf)  # [B, n]
    eflat = s_eff.ravel()
    for it in range(num_slots - n):
        pos = off + s_eff.argmax(1)  # [B]
        c = cflat[pos] + 1
        cflat[pos] = c
        new = wflat[pos] / (c + delta)
        sflat[pos] = new
        eflat[pos] = np.where((c < cap) | open_all, new, -np.inf)
        nxt = n + it + 1 >= n * cap
        turn = nxt & ~open_all
        if turn.any():
            s_eff[turn] = score[turn]
            open_all = nxt
    return counts


def items_from_counts(counts: np.ndarray) -> np.ndarray:
    """``counts [B, n]`` (rows sum to ``m``) -> ``item_expert [B, m]``, experts in increasing order."""
    B, n = counts.shape
    m = int(counts[0].sum())
    return np.repeat(np.tile(np.arange(n), B), counts.ravel()).reshape(B, m)


def _sorted_desc(items: np.ndarray):
    order = np.argsort(-items, axis=1, kind="stable")  # [B, m] heaviest first, ties by index
    B, m = items.shape
    srt = items.ravel()[(np.arange(B) * m)[:, None] + order]
    return order, srt


def _layout(order: np.ndarray, slot_sorted: np.ndarray, num_packs: int) -> np.ndarray:
    """Item ``order[b, i]`` goes to flat slot ``slot_sorted[b, i]`` (= pack * k + rank) -> ``idx [B, P, k]``."""
    B, m = order.shape
    idx = np.empty((B, m), dtype=np.int64)
    idx[np.arange(B)[:, None], slot_sorted] = order
    return idx.reshape(B, num_packs, m // num_packs)


def greedy_pack(items: np.ndarray, num_packs: int) -> np.ndarray:
    """Greedy balanced packing (heaviest item first, into the lightest pack with room; ties: lowest
    index), the rule and tie-breaking of :func:`eplb.packing.greedy_packing`.

    ``items [B, m]`` -> layout ``idx [B, P, k]`` (items of a pack in insertion order).
    """
    B, m = items.shape
    P = num_packs
    k = m // P
    order, srt = _sorted_desc(items)
    srt_t = np.ascontiguousarray(srt.T)  # [m, B]
    loads = np.zeros((B, P))  # full packs are +inf
    fill = np.zeros(B * P, dtype=np.int64)
    lflat = loads.ravel()
    off = np.arange(B) * P
    slot = np.empty((m, B), dtype=np.int64)
    for i in range(m):
        p = loads.argmin(1)  # [B] first lightest pack with room
        pos = off + p
        f = fill[pos] + 1
        fill[pos] = f
        slot[i] = p * k + f - 1
        lflat[pos] = np.where(f == k, np.inf, lflat[pos] + srt_t[i])
    return _layout(order, slot.T, P)


def differencing_pack(items: np.ndarray, num_packs: int) -> np.ndarray:
    """Balanced largest-differencing (Karmarkar-Karp) packing, ``m / P`` items per pack.

    Sorted items are cut into ``k`` rounds of ``P`` (partial solutions with one item per pack); the
    two partial solutions with the largest spread (max - min pack sum) are merged, heaviest pack of
    one with lightest of the other, ``k - 1`` times. Each final pack holds one item of every round,
    so an item's position in its pack is its round. ``items [B, m]`` -> layout ``idx [B, P, k]``.
    """
    B, m = items.shape
    P = num_packs
    k = m // P
    order, srt = _sorted_desc(items)
    sums = srt.reshape(B * k, P).copy()  # [B*k, P] pack sums of each partial solution
    s3 = srt.reshape(B, k, P)
    spread = s3[:, :, 0] - s3[:, :, P - 1]  # [B, k] (rounds are sorted)
    sub = np.broadcast_to(np.arange(m) % P, (B, m)).copy()  # [B, m] pack (inside its partial) of each sorted item
    part = np.broadcast_to(np.arange(m) // P, (B, m)).copy()  # [B, m] partial of each sorted item
    rows = np.arange(B)
    rc = rows[:, None]
    offP = rc * P
    for _ in range(k - 1):
        a = spread.argmax(1)
        spread[rows, a] = -np.inf
        b = spread.argmax(1)
        spread[rows, b] = -np.inf  # b is merged away
        sa, sb = sums[rows * k + a], sums[rows * k + b]  # [B, P]
        desc_a = np.argsort(-sa, axis=1, kind="stable")
        asc_b = np.argsort(sb, axis=1, kind="stable")
        target = np.empty_like(asc_b)
        target[rc, asc_b] = desc_a  # pack of a that receives b's pack j
        inv = np.empty_like(asc_b)
        inv[rc, desc_a] = asc_b  # pack of b merged into a's pack p
        sa = sa + sb.ravel()[offP + inv]
        sums[rows * k + a] = sa
        spread[rows, a] = _row_max(sa) - _row_min(sa)
        in_b = part == b[:, None]  # [B, m]
        sub = np.where(in_b, target.ravel()[offP + sub], sub)
        part = np.where(in_b, a[:, None], part)
    return _layout(order, sub * k + np.arange(m) // P, P)


def refine_swaps(items: np.ndarray, idx: np.ndarray, target: np.ndarray | None = None,
                 partners: int = 16, max_iters: int | None = None, tol: float = 1e-12) -> np.ndarray:
    """Swap refinement of layouts, in place; returns ``idx``.

    Each iteration, for every active row: try every swap of one item of the heaviest pack with one
    item of each of the ``partners`` lightest packs (a ``[A, partners, k, k]`` array) and apply the
    one with the smallest new maximum of the two packs, if it is strictly below the row's maximum.
    A row leaves the active set when no swap improves it or when its maximum is at or below
    ``target [B] * (1 + tol)`` (``target``: a lower bound that makes further work useless; ``tol``:
    how close to it is close enough). No row's maximum ever rises. ``items [B, m]``, ``idx [B, P, k]``.
    """
    B, P, k = idx.shape
    if P == 1 or k == 0 or B == 0:
        return idx
    if max_iters is None:
        max_iters = 4 * P + 16
    m = P * k
    W = items.ravel()[(np.arange(B) * m)[:, None] + idx.reshape(B, m)]  # [B, m] loads in layout order
    Wf, If = W.ravel(), idx.reshape(-1)  # flat views, index = row * m + pack * k + pos
    load = _row_sum(W.reshape(B, P, k))  # [B, P], updated incrementally
    lf = load.ravel()
    stop = np.full(B, -np.inf) if target is None else target * (1 + tol)
    t = min(P, partners)
    kk = k * k
    active = np.arange(B)
    ar_k = np.arange(k)
    for _ in range(max_iters):
        La = load[active]  # [A, P]
        h = La.argmax(1)
        top = lf[active * P + h]
        go = top > stop[active]
        if not go.all():
            active, La, h, top = active[go], La[go], h[go], top[go]
            if len(active) == 0:
                break
        A = len(active)
        base = active * m  # [A]
        Wh = Wf[(base + h * k)[:, None] + ar_k]  # [A, k]
        if t < P:
            cand = np.argpartition(La, t - 1, axis=1)[:, :t]  # [A, t]
            light = La.ravel()[(np.arange(A) * P)[:, None] + cand]
            Wc = Wf[(base[:, None] + cand * k)[:, :, None] + ar_k]  # [A, t, k]
        else:
            cand, light = None, La
            Wc = W[active].reshape(A, P, k)
        d = Wh[:, None, :, None] - Wc[:, :, None, :]  # [A, t, k, k]
        new = np.maximum(top[:, None, None, None] - d, light[:, :, None, None] + d)
        new[d <= 0] = np.inf
        flat = new.reshape(A, -1)
        where = flat.argmin(1)
        ok = flat.ravel()[np.arange(A) * flat.shape[1] + where] < top * (1 - 1e-12)
        if not ok.any():
            break
        r, h, where = active[ok], h[ok], where[ok]
        g, i, j = where // kk, (where // k) % k, where % k
        if cand is not None:
            g = cand[ok, g]
        pa, pb = r * m + h * k + i, r * m + g * k + j
        wa, wb = Wf[pa], Wf[pb]
        Wf[pa], Wf[pb] = wb, wa
        If[pa], If[pb] = If[pb], If[pa]
        lf[r * P + h] += wb - wa
        lf[r * P + g] += wa - wb
        active = r
    return idx


def layout_loads(items: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pack sums of a layout: ``items [B, m]``, ``idx [B, P, k]`` -> ``[B, P]`` (fresh sums)."""
    B, P, k = idx.shape
    return _row_sum(items.ravel()[(np.arange(B) * items.shape[1])[:, None, None] + idx])
