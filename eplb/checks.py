"""Argument validation shared by every policy: one clear ValueError naming the field."""
from __future__ import annotations

import numpy as np
import torch


def as_load_tensor(weight, name: str = "weight") -> torch.Tensor:
    """Convert ``weight`` (torch tensor, numpy array or nested lists) to a float64 CPU tensor.

    Input: loads ``[layers, logical_experts]``. Output: ``torch.float64`` ``[layers, logical_experts]``.
    Raises ValueError (naming ``name``) for a wrong ndim, an empty axis, NaN/inf or negative values.
    """
    if isinstance(weight, torch.Tensor):
        w = weight.detach().to("cpu")
        if w.is_complex() or w.dtype == torch.bool:
            raise ValueError(f"{name}: expected real numbers, got dtype {w.dtype}")
        w = w.to(torch.float64)
    else:
        try:
            arr = np.asarray(weight, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: not a numeric array ({exc})") from None
        w = torch.from_numpy(arr.copy())
    if w.ndim != 2:
        raise ValueError(f"{name}: expected 2 dims [layers, logical_experts], got shape {tuple(w.shape)}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name}: empty shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    if bool((w < 0).any()):
        raise ValueError(f"{name}: contains negative loads")
    return w.contiguous()


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")
    return int(value)


def check_topology(num_experts: int, num_replicas, num_groups, num_nodes, num_gpus) -> tuple[int, int, int, int, bool]:
    """Validate the topology; return ``(num_replicas, num_groups, num_nodes, num_gpus, hierarchical)``.

    ``hierarchical`` is True when ``num_groups % num_nodes == 0`` (DeepSeek's rule); otherwise the
    global policy is used (one node, one group). Raises ValueError naming the offending field.
    """
    R = _positive_int(num_replicas, "num_replicas")
    G = _positive_int(num_groups, "num_groups")
    N = _positive_int(num_nodes, "num_nodes")
    P = _positive_int(num_gpus, "num_gpus")
    if R < num_experts:
        raise ValueError(f"num_replicas: {R} < number of logical experts {num_experts}")
    if R % P:
        raise ValueError(f"num_replicas: {R} is not divisible by num_gpus {P}")
    if P % N:
        raise ValueError(f"num_gpus: {P} is not divisible by num_nodes {N}")
    hierarchical = G % N == 0
    if hierarchical and num_experts % G:
        raise ValueError(f"num_groups: {num_experts} logical experts are not divisible into {G} groups")
    return R, G, N, P, hierarchical
