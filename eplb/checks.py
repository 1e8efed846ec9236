"""Argument validation shared by every policy: one clear ValueError naming the field."""
from __future__ import annotations

import numpy as np
import torch


def as_load_tensor(weight, name: str = "weight") -> torch.Tensor:
    """Convert ``weight`` (torch tensor, numpy array or nested lists) to a float64 CPU tensor.

    Input: loads ``[layers, logical_experts]``. Output: ``torch.float64`` ``[layers, logical_experts]``.
    Raises ValueError (naming ``name``) for a wrong ndim, an empty axis, a number beyond float64,
    NaN/inf or negative values.
    """
    if isinstance(weight, torch.Tensor):
        w = weight.detach().to("cpu")
        if w.is_complex() or w.dtype == torch.bool:
            raise ValueError(f"{name}: expected real numbers, got dtype {w.dtype}")
        w = w.to(torch.float64)
    else:
        try:
            arr = np.asarray(weight, dtype=np.float64)
        except OverflowError:  # a Python int beyond float64 (JSON allows any size)
            raise ValueError(f"{name}: contains a number too large for float64") from None
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


# Layers whose largest load is above this are rescaled for planning (see scale_for_planning).
PLANNING_SCALE_LIMIT = 2.0 ** 512  # ~1.3e154: even 2**400 experts of this load sum far below float64's max


def scale_for_planning(w: torch.Tensor) -> torch.Tensor:
    """Loads ``[L, E]`` float64 (checked by :func:`as_load_tensor`) -> loads safe to sum, ``[L, E]``.

    Balance is scale-invariant per layer (a placement's per-GPU loads scale with the layer's loads),
    so each layer whose largest load exceeds :data:`PLANNING_SCALE_LIMIT` is multiplied by a power
    of two that brings that largest load into ``[0.5, 1)``. Power-of-two scaling is exact in
    floating point (only entries below ~2**-1022 times the layer's largest lose precision, down to
    0), so the plan is the one for the given loads, and no sum the planner forms (GPU, node and group loads, perturbed
    loads of the drift hedge) can overflow. Other layers are returned bit for bit.
    """
    top = w.max(-1).values  # [L]
    big = top > PLANNING_SCALE_LIMIT
    if not bool(big.any()):
        return w
    _, exp = torch.frexp(top)  # top = mantissa * 2**exp, mantissa in [0.5, 1)
    shift = torch.where(big, -exp, torch.zeros_like(exp))  # [L]
    return torch.ldexp(w, shift.unsqueeze(-1).to(torch.float64))


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
