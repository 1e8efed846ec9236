"""The default policy: a small portfolio of replica-count rules and packings, best kept per layer.

Stages:

1. groups -> nodes (hierarchical, several groups per node): greedy packing of the group loads and
   differencing + swap refinement; both are planned through, each layer keeps the better plan.
2. replica counts per node: greedy's rule (minimal largest per-replica load) and divisor rules
   capped at the number of GPUs of the node (see :func:`eplb.replication.replicate_divisor`):
   a hot expert never gets more replicas than GPUs to spread them over, and ``delta`` trades
   replicas of hot experts for second replicas of warm ones.
3. replicas -> GPUs: greedy or differencing (Karmarkar-Karp) packing, polished by swaps between the
   heaviest GPU and the lightest ones.

Every (candidate, group option, layer, node) is one row of a single NumPy batch (see
:mod:`eplb.kernels`), so each stage is one loop over replicas / items / iterations for all of them.
A row stops refining once its heaviest GPU is at a lower bound of its layer's heaviest GPU (the
largest over the layer's nodes of ``max(mean GPU load, largest optimal per-replica load)``):
below that it cannot change the layer's maximum. Rows whose replica counts repeat an earlier rule
with the same packer, and group option 1 where it groups like option 0, are not packed or refined.

Each (layer, node) keeps the candidate with the lowest heaviest GPU, each layer the group option
with the lowest heaviest GPU. Candidate 0 is greedy's own replica counts and packing, and swaps
never raise a maximum, so the result is never worse than greedy on the planning loads, layer by layer.

Drift hedge (``robust``, on by default): within the chosen group option, each (layer, node) then
keeps, among the refined rules and greedy's own unrefined plan, the one with the lowest mean heaviest
GPU over seeded perturbations of the loads; a layer takes that choice only if it stays no worse than
greedy on the planning loads (so the guarantee above holds with the hedge too).
"""
from __future__ import annotations

import numpy as np
import torch

from .kernels import (_row_max, _row_sum, differencing_pack, greedy_pack, items_from_counts, layout_loads,
                      refine_swaps, replicate_rows)
from .layout import node_major_order
from .packing import greedy_packing
from .pipeline import node_stage

# (cap replicas at GPUs per node?, delta of the divisor rule, packing) -- candidate 0 is greedy's.
# A fourth rule (capped, delta = 0, differencing) was dropped: over 42 benchmark cases it never changed
# a layer's heaviest GPU by more than 0.01% (docs/benchmarks.md (section 2)).
COUNT_RULES = ((False, 0.0, "greedy"), (True, -0.5, "differencing"), (True, 1.0, "differencing"))
# drift hedge: (perturbed load samples, sigma of the lognormal per-expert noise)
HEDGE = (8, 0.2)


def _refined_group_stage(weight: torch.Tensor, num_groups: int, num_nodes: int) -> torch.Tensor:
    """Groups -> nodes by differencing + swaps (all nodes as partners). ``[L, E]`` -> ``mlog2log [L, E]``."""
    L, E = weight.shape
    gl = weight.view(L, num_groups, E // num_groups).sum(-1).numpy()  # [L, G]
    idx = differencing_pack(gl, num_nodes)  # [L, N, G/N]
    refine_swaps(gl, idx, partners=num_nodes)
    node = np.empty((L, num_groups), dtype=np.int64)
    rank = np.empty((L, num_groups), dtype=np.int64)
    rows = np.arange(L)[:, None, None]
    node[rows, idx] = np.arange(num_nodes)[None, :, None]
    rank[rows, idx] = np.arange(num_groups // num_nodes)[None, None, :]
    return node_major_order(torch.from_numpy(node), torch.from_numpy(rank), E // num_groups)


def _same_partition(mlog_a: np.ndarray, mlog_b: np.ndarray, group_size: int, num_nodes: int) -> np.ndarray:
    """Per layer: do two node-major orders ``[L, E]`` put the same sets of groups on the nodes? -> ``[L]`` bool."""
    L, E = mlog_a.shape
    out = []
    for mlog in (mlog_a, mlog_b):
        groups = np.sort(mlog[:, ::group_size].reshape(L, num_nodes, -1) // group_size, axis=-1)  # [L, N, G/N]
        first = np.argsort(groups[:, :, 0], axis=1)  # nodes ordered by their smallest group
        out.append(np.take_along_axis(groups, first[:, :, None], 1).reshape(L, -1))
    return (out[0] == out[1]).all(-1)


def plan_candidates(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                    rules=COUNT_RULES, partners: int = 16, tol: float = 1e-12):
    """Plan every candidate. Returns a dict of NumPy arrays (``C`` rules, ``S`` group options):

    ``mlog2log [S, L, E]``, ``item_expert [C, S, L, N, m]`` (node-local expert of each replica),
    ``idx [C, S, L, N, ppn, k]`` (replica ids per GPU), ``top [C, S, L, N]`` heaviest GPU of each
    row (``inf`` for duplicate rows that were skipped), ``bound [S, L]`` (layer lower bound used to stop),
    ``rules`` (the count rules, as given), ``idx0`` / ``top0`` (the same before the swap refinement;
    rule 0 / option 0 is greedy's own plan), ``counts [C, S, L, N, n]`` (replicas of each node-local
    expert) and ``dup [C, S, L, N]`` (rows skipped as duplicates of an earlier rule's).
    """
    L, E = weight.shape
    N, P = num_nodes, num_gpus
    n, m, ppn, k = E // N, num_replicas // N, P // N, num_replicas // P
    options = [node_stage(weight, num_groups, N, greedy_packing)]
    if N > 1 and num_groups // N > 1:
        options.append(_refined_group_stage(weight, num_groups, N))
    S, C = len(options), len(rules)
    if m == n:  # no redundant slots: every rule gives one replica each; keep one rule per packer
        seen, kept = set(), []
        for rule in rules:
            if rule[2] not in seen:
                seen.add(rule[2])
                kept.append(rule)
        rules, C = tuple(kept), len(kept)
    mlog = np.stack([o.numpy() for o in options])  # [S, L, E]
    w = weight.numpy()
    wn = np.take_along_axis(np.broadcast_to(w, (S, L, E)), mlog, 2).reshape(S * L * N, n)  # [S*L*N, n]
    B0 = S * L * N
    w_rows = np.broadcast_to(wn, (C, B0, n)).reshape(C * B0, n)  # [B, n], rule-major rows
    cap = np.repeat(np.array([ppn if r[0] else m for r in rules], dtype=np.int64), B0)
    delta = np.repeat(np.array([r[1] for r in rules], dtype=np.float64), B0)
    counts = replicate_rows(w_rows, m, cap, delta)  # [B, n]
    item_expert = items_from_counts(counts)  # [B, m]
    items = np.take_along_axis(w_rows / counts, item_expert, 1)  # [B, m] per-replica loads
    # rows whose counts repeat an earlier rule with the same packer are skipped, and so are the rows
    # of group option 1 for layers where it puts the same groups together as option 0
    dup = np.zeros((C, B0), dtype=bool)
    if S == 2:
        same = _same_partition(mlog[0], mlog[1], E // num_groups, N)  # [L]
        dup.reshape(C, S, L, N)[:, 1] |= same[None, :, None]
    cnt = counts.reshape(C, B0, n)
    for c in range(1, C):
        for c2 in range(c):
            if rules[c2][2] == rules[c][2]:
                dup[c] |= _row_sum(np.abs(cnt[c] - cnt[c2]).astype(np.float64)) == 0
    dup = dup.ravel()
    idx = np.empty((C * B0, ppn, k), dtype=np.int64)  # [B, ppn, k] replica ids on each GPU
    idx[dup] = np.arange(m).reshape(ppn, k)
    packer = np.repeat(np.array([r[2] for r in rules]), B0)
    for name, fn in (("greedy", greedy_pack), ("differencing", differencing_pack)):
        sel = (packer == name) & ~dup
        if sel.any():
            idx[sel] = fn(items[sel], ppn)
    # lower bound of each layer's heaviest GPU (per group option): max over nodes of the row bound,
    # the row bound being max(mean GPU load, the smallest largest per-replica load over the rules)
    row_lb = np.maximum(_row_sum(items) / ppn, _row_max(items)).reshape(C, S, L, N)
    bound = row_lb.min(0).max(-1)  # [S, L]
    stop = np.where(dup, np.inf, np.broadcast_to(bound[None, :, :, None], (C, S, L, N)).ravel())
    idx0 = idx.copy()  # before refinement; rule 0 / option 0 is greedy's own plan
    refine_swaps(items, idx, stop, partners, tol=tol)
    top = np.where(dup, np.inf, _row_max(layout_loads(items, idx)))
    return dict(mlog2log=mlog, item_expert=item_expert.reshape(C, S, L, N, m),
                idx=idx.reshape(C, S, L, N, ppn, k), top=top.reshape(C, S, L, N), bound=bound, rules=rules,
                idx0=idx0.reshape(C, S, L, N, ppn, k), counts=counts.reshape(C, S, L, N, n), dup=dup.reshape(C, S, L, N),
                top0=np.where(dup, np.inf, _row_max(layout_loads(items, idx0))).reshape(C, S, L, N))


def _assemble(mlog2log: np.ndarray, item_expert: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``mlog2log [L, E]``, ``item_expert [L, N, m]``, layouts ``idx [L, N, ppn, k]`` -> ``phy2log [L, R]``."""
    L, N, m = item_expert.shape
    n = mlog2log.shape[1] // N
    slot_local = np.take_along_axis(item_expert, idx.reshape(L, N, m), 2) + (np.arange(N) * n)[None, :, None]
    return np.take_along_axis(mlog2log, slot_local.reshape(L, N * m), 1)


def _perturbed_tops(weight: np.ndarray, phy: np.ndarray, div: np.ndarray, ppn: int, samples: int, sigma: float,
                    seed: int = 0) -> np.ndarray:
    """Heaviest GPU of candidate node plans under perturbed loads: every logical expert's load times
    lognormal(0, ``sigma``) noise, ``samples`` draws (seeded: plans stay deterministic).

    ``weight [L, E]``; ``phy [X, L, N, m]`` logical expert in each slot of each candidate;
    ``div [X, L, N, m]`` its replica count. Returns ``[samples, X, L, N]``.
    """
    L, E = weight.shape
    X, _, N, m = phy.shape
    rng = np.random.default_rng(seed)
    wk = (weight[None] * rng.lognormal(0.0, sigma, size=(samples, L, E))).reshape(samples, L * E)
    flat = (phy + (np.arange(L) * E)[None, :, None, None]).reshape(-1)  # [X*L*N*m]
    per_slot = wk[:, flat].reshape(samples, X * L * N * ppn, m // ppn) / div.reshape(1, X * L * N * ppn, m // ppn)
    gpu = per_slot @ np.ones(m // ppn)  # [K, X*L*N*ppn]
    gpu = gpu.reshape(-1, ppn)
    return gpu.ravel()[np.arange(gpu.shape[0]) * ppn + gpu.argmax(1)].reshape(samples, X, L, N)


def default_plan(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                 rules=COUNT_RULES, partners: int = 16, tol: float = 1e-12, robust=HEDGE) -> torch.Tensor:
    """Default placement. ``weight [L, E]`` float64 -> ``phy2log [L, R]`` int64.

    Call with ``num_groups = num_nodes = 1`` for the global policy. ``rules``: the replica-count
    candidates (see :data:`COUNT_RULES`; keep greedy's first to keep the never-worse guarantee);
    ``partners``: how many of the lightest GPUs the swap search pairs with the heaviest; ``tol``:
    a row stops refining within ``tol`` (relative) of its layer's lower bound; ``robust``:
    ``(samples, sigma)`` of the drift hedge (see :func:`_perturbed_tops`), None to keep the plan
    that is best on ``weight`` alone.
    """
    cands = plan_candidates(weight, num_replicas, num_groups, num_nodes, num_gpus, rules, partners, tol)
    top = cands["top"]  # [C, S, L, N]
    C, S, L, N = top.shape
    li, ni, la = np.arange(L)[:, None], np.arange(N)[None, :], np.arange(L)
    rule = top.argmin(0)  # [S, L, N] first (greedy's) on ties
    layer_top = top.min(0).max(-1)  # [S, L]
    option = layer_top.argmin(0)  # [L]
    r, o = rule[option, la], option[:, None]  # [L, N], [L, 1]
    phy2log = _assemble(cands["mlog2log"][option, la], cands["item_expert"][r, o, li, ni], cands["idx"][r, o, li, ni])
    if robust:
        # drift hedge: among the refined rules and greedy's own plan (within the chosen group option),
        # each (layer, node) keeps the plan with the lowest mean heaviest GPU over perturbed loads;
        # a layer keeps the result only if it is no worse than greedy's plan on the planning loads
        samples, sigma = robust
        E = weight.shape[1]
        m = cands["item_expert"].shape[-1]
        ppn = cands["idx"].shape[-2]
        lay = np.concatenate([cands["idx"][:, option, la], cands["idx0"][:1, 0]], 0)  # [X, L, N, ppn, k]
        ie = np.concatenate([cands["item_expert"][:, option, la], cands["item_expert"][:1, 0]], 0)  # [X, L, N, m]
        cnt = np.concatenate([cands["counts"][:, option, la], cands["counts"][:1, 0]], 0)  # [X, L, N, n]
        mlog = np.concatenate([np.broadcast_to(cands["mlog2log"][option, la], (C, L, E)), cands["mlog2log"][:1]], 0)
        X = C + 1
        local = np.take_along_axis(ie, lay.reshape(X, L, N, m), -1)  # [X, L, N, m] node-local expert per slot
        div = np.take_along_axis(cnt, local, -1).astype(np.float64)
        phy = np.take_along_axis(mlog, (local + (np.arange(N) * (E // N))[:, None]).reshape(X, L, N * m), -1).reshape(X, L, N, m)
        g_top = np.where((option == 0)[:, None], cands["top0"][0, 0], np.inf)  # greedy's nodes mix only with option 0
        plan_t = np.concatenate([top[:, option, la], g_top[None]], 0)  # [X, L, N]
        pt = _perturbed_tops(weight.numpy(), phy, div, ppn, samples, sigma)  # [K, X, L, N]
        xs = np.where(np.isfinite(plan_t), pt.mean(0), np.inf).argmin(0)  # [L, N]
        ok = plan_t[xs, li, ni].max(-1) <= cands["top0"][0, 0].max(-1)  # [L] no worse than greedy on the planning loads
        rob = phy[xs, li, ni].reshape(L, N * m)
        phy2log = np.where(ok[:, None], rob, phy2log)
    return torch.from_numpy(phy2log)
