"""``rebalance_experts``: the drop-in entry point (same call and outputs as DeepSeek's ``eplb.py``)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .checks import as_load_tensor, check_topology, scale_for_planning
from .greedy import greedy_plan, greedy_pylist, greedy_torch_loops
from .layout import log2phy_from_phy2log
from .movement import minimize_movement
from .policy import HEDGE, default_plan

POLICIES = ("default", "greedy", "greedy_torch_loops", "greedy_pylist", "greedy_reference")
_LOOP_BASELINES = {"greedy_torch_loops": greedy_torch_loops, "greedy_pylist": greedy_pylist, "greedy_reference": greedy_pylist}


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with ``n`` intra-op torch threads (restored after); the planner's tensors are tiny, and
    thread hand-offs cost more than they save."""
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def check_placement(phy2log, num_layers: int, num_experts: int, num_replicas: int, name: str = "previous_phy2log") -> torch.Tensor:
    """Validate a placement ``[L, R]`` (ints in ``[0, E)``); returns it as int64. ValueError names ``name``."""
    if isinstance(phy2log, torch.Tensor):
        p = phy2log
        if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
            raise ValueError(f"{name}: expected integers, got dtype {p.dtype}")
    else:
        try:
            arr = np.asarray(phy2log)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{name}: not an integer array ({exc})") from None
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}: logical expert ids must be in [0, {num_experts})")
        p = torch.from_numpy(arr.astype(np.int64))
    p = p.to("cpu", torch.int64)
    if tuple(p.shape) != (num_layers, num_replicas):
        raise ValueError(f"{name}: expected shape {(num_layers, num_replicas)}, got {tuple(p.shape)}")
    if bool((p < 0).any()) or bool((p >= num_experts).any()):
        raise ValueError(f"{name}: logical expert ids must be in [0, {num_experts})")
    return p.contiguous()


def _check_covers(phy2log: torch.Tensor, num_experts: int, name: str = "previous_phy2log") -> None:
    """Every layer of ``phy2log [L, R]`` must hold every expert at least once (to be kept as a plan)."""
    L, R = phy2log.shape
    cnt = torch.zeros(L, num_experts, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    missing = (cnt == 0).nonzero()
    if len(missing):
        layer, e = missing[0].tolist()
        raise ValueError(f"{name}: layer {layer} has no slot for expert {e}; every expert needs one")


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                      policy: str = "default", previous_phy2log=None, num_threads: int | None = 1,
                      drift_hedge: bool = True, max_moves: int | None = None):
    """Plan a placement of replicated experts on GPUs.

    Inputs:
        weight: ``[layers, logical_experts]`` loads (torch tensor, numpy array or nested lists),
            finite and non-negative. Any float64 value is accepted: a layer with loads above 2**512
            is planned on its loads times a power of two (exact; balance is scale-invariant per
            layer), so sums cannot overflow (see :func:`eplb.checks.scale_for_planning`).
        num_replicas: physical slots per layer ``R`` (``>= logical_experts``, divisible by ``num_gpus``).
        num_groups: expert groups (consecutive logical ids). When ``num_groups % num_nodes == 0`` the
            hierarchical policy is used: all replicas of a group's experts live on one node and every
            node holds ``num_groups / num_nodes`` groups; otherwise the global policy (1 node, 1 group).
        num_nodes: nodes; their GPUs are consecutive.
        num_gpus: GPUs ``P``; GPU ``g`` owns slots ``g*R/P .. (g+1)*R/P - 1``.
        policy: ``"default"`` (never worse than greedy on ``weight``, much better when skewed),
            ``"greedy"`` (the published baseline, vectorised), or the same algorithm as per-layer Python
            loops: ``"greedy_torch_loops"`` (over torch tensors, DeepSeek's style) or ``"greedy_pylist"``
            (over lists; ``"greedy_reference"`` is its old name). Identical placements for the greedy ones.
        previous_phy2log: optional current placement ``[layers, R]``; the plan's GPUs and slots are
            relabelled so that as many slots as possible keep their expert (balance is unchanged).
        num_threads: torch intra-op threads while planning (restored after); None leaves them alone.
        drift_hedge: default policy only. Among its candidate plans, each (layer, node) keeps the one
            with the lowest mean heaviest GPU over 8 seeded perturbations of ``weight`` (lognormal(0, 0.2)
            per expert), where that layer stays no worse than greedy on ``weight`` itself. False: keep
            the plan that is best on ``weight`` alone.
        max_moves: movement budget per layer (needs ``previous_phy2log``): a layer whose plan changes
            more than ``max_moves`` slots keeps its previous placement unchanged.

    Returns ``(phy2log [L, R], log2phy [L, E, R - E + 1] (-1 padded), logcnt [L, E])``, int64 tensors.
    Raises ValueError naming the offending argument for invalid input.
    """
    w = scale_for_planning(as_load_tensor(weight))  # [L, E] float64, per-layer rescaled if huge
    L, E = w.shape
    R, G, N, P, hierarchical = check_topology(E, num_replicas, num_groups, num_nodes, num_gpus)
    g, n = (G, N) if hierarchical else (1, 1)
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    prev = None if previous_phy2log is None else check_placement(previous_phy2log, L, E, R)
    if max_moves is not None:
        if isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer)) or max_moves < 0:
            raise ValueError(f"max_moves: expected an int >= 0, got {max_moves!r}")
        if prev is None:
            raise ValueError("max_moves: needs previous_phy2log (the placement to keep)")
        _check_covers(prev, E)
    with _threads(num_threads):
        if policy == "default":
            phy2log = default_plan(w, R, g, n, P, robust=HEDGE if drift_hedge else None)
        elif policy == "greedy":
            phy2log = greedy_plan(w, R, g, n, P)
        else:
            phy2log = _LOOP_BASELINES[policy](w.numpy(), R, g, n, P)
        if prev is not None:
            phy2log = minimize_movement(phy2log, prev, P, n)
        if max_moves is not None:
            too_many = (phy2log != prev).sum(-1) > max_moves  # [L]
            phy2log = torch.where(too_many.unsqueeze(-1), prev, phy2log)
        log2phy, logcnt = log2phy_from_phy2log(phy2log, E)
    return phy2log, log2phy, logcnt
