"""Balance metrics for placements. Loads are spread evenly over an expert's replicas."""
from __future__ import annotations

import numpy as np
import torch

from .replication import max_per_replica_threshold


def _t(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def gpu_load(weight, phy2log, num_gpus: int) -> torch.Tensor:
    """Per-GPU load. ``weight [L, E]``, ``phy2log [L, R]`` -> ``[L, num_gpus]`` float64.

    A GPU's load is the sum over its slots of ``weight[expert] / logcnt[expert]``.
    """
    w = _t(weight, torch.float64)
    p2l = _t(phy2log, torch.int64)
    L, E = w.shape
    R = p2l.shape[1]
    cnt = torch.zeros(L, E, dtype=torch.float64).scatter_add_(1, p2l, torch.ones(L, R, dtype=torch.float64))
    per_slot = (w / cnt.clamp_min(1)).gather(1, p2l)  # [L, R]
    return per_slot.view(L, num_gpus, R // num_gpus).sum(-1)


def balancedness_per_layer(loads) -> torch.Tensor:
    """Mean / max over the last axis (``[..., P]`` -> ``[...]``); 1.0 is perfect, all-zero rows give 1.0."""
    x = _t(loads, torch.float64)
    mx = x.max(-1).values
    return torch.where(mx > 0, x.mean(-1) / torch.where(mx > 0, mx, 1.0), torch.ones_like(mx))


def balancedness(loads) -> float:
    """Aggregate balancedness of per-GPU loads ``[L, P]``: sum of per-layer means / sum of per-layer maxima.

    This is the number vLLM and SGLang log (layers weighted by their max load); 1.0 when all zero.
    """
    x = _t(loads, torch.float64)
    x = x.reshape(-1, x.shape[-1])
    top = float(x.max(-1).values.sum())
    return 1.0 if top <= 0 else float(x.mean(-1).sum()) / top


def plan_balancedness(weight, phy2log, num_gpus: int, per_layer: bool = False):
    """Balancedness of a placement ``phy2log [L, R]`` on loads ``weight [L, E]``.

    Returns the aggregate (a float, see :func:`balancedness`), or with ``per_layer`` each layer's
    mean / max GPU load as float64 ``[L]`` (see :func:`balancedness_per_layer`).
    """
    loads = gpu_load(weight, phy2log, num_gpus)
    return balancedness_per_layer(loads) if per_layer else balancedness(loads)


def max_load_lower_bound(weight, num_replicas: int, num_groups: int = 1, num_nodes: int = 1, num_gpus: int = 1) -> torch.Tensor:
    """Lower bound on the max GPU load any valid placement can reach, per layer: ``[L, E]`` -> ``[L]``.

    The maximum of: the mean GPU load; the optimal largest per-replica load for ``num_replicas``
    slots (some GPU holds that replica); and, for the hierarchical policy (``num_groups %
    num_nodes == 0``, with ``G/N`` groups on every node), the smallest possible heaviest-node load
    divided by GPUs per node, bounded below by (heaviest group + the lightest ``G/N - 1`` other groups)
    and by the total / nodes; when every node holds one group, the per-replica optimum of each node
    within its ``R/N`` slots.
    """
    w = _t(weight, torch.float64)
    L, E = w.shape
    bound = torch.maximum(w.sum(-1) / num_gpus, max_per_replica_threshold(w, num_replicas))
    if num_nodes > 1 and num_groups % num_nodes == 0 and E % num_groups == 0:
        gpn = num_groups // num_nodes
        ppn = num_gpus // num_nodes
        group = torch.sort(w.view(L, num_groups, E // num_groups).sum(-1), dim=-1).values  # [L, G] ascending
        heavy_node = group[:, -1] + group[:, : gpn - 1].sum(-1)
        node_bound = torch.maximum(heavy_node, w.sum(-1) / num_nodes) / ppn
        bound = torch.maximum(bound, node_bound)
        if gpn == 1:
            per_node = w.view(L * num_nodes, E // num_nodes)
            t = max_per_replica_threshold(per_node, num_replicas // num_nodes).view(L, num_nodes)
            bound = torch.maximum(bound, t.max(-1).values)
    return bound


def lower_bound_balancedness(weight, num_replicas: int, num_groups: int = 1, num_nodes: int = 1, num_gpus: int = 1) -> float:
    """Upper bound on reachable aggregate balancedness: sum of mean GPU loads / sum of max-load lower bounds."""
    w = _t(weight, torch.float64)
    b = float(max_load_lower_bound(w, num_replicas, num_groups, num_nodes, num_gpus).sum())
    return 1.0 if b <= 0 else float(w.sum()) / num_gpus / b


def experts_moved(old_phy2log, new_phy2log) -> int:
    """Number of physical slots whose logical expert changes between two placements ``[L, R]``."""
    a, b = _t(old_phy2log, torch.int64), _t(new_phy2log, torch.int64)
    if a.shape != b.shape:
        raise ValueError(f"previous_phy2log: shape {tuple(a.shape)} differs from new placement {tuple(b.shape)}")
    return int((a != b).sum())
