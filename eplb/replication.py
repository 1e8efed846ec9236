"""Replica counts: how many physical slots each logical expert gets."""
from __future__ import annotations

import torch


def replicate_greedy(weight: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Give one slot to every expert, then each extra slot to the expert with the largest load per replica.

    Input: ``weight [B, n]`` float loads, ``num_slots >= n``.
    Output: ``counts [B, n]`` int64, every entry >= 1, each row sums to ``num_slots``.

    This greedy rule (D'Hondt / Jefferson apportionment) minimises the largest per-replica load
    ``max_e weight[e] / counts[e]`` (and is lexicographically optimal), so no policy can beat it on
    that quantity; improvements must come from packing. Ties go to the lowest expert id.
    """
    B, n = weight.shape
    counts = torch.ones(B, n, dtype=torch.int64)  # [B, n]
    rows = torch.arange(B)
    per_replica = weight.clone()  # [B, n]
    for _ in range(num_slots - n):
        e = per_replica.argmax(-1)  # [B]
        counts[rows, e] += 1
        per_replica[rows, e] = weight[rows, e] / counts[rows, e]
    return counts


def max_per_replica_threshold(weight: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Smallest achievable ``max_e weight[e] / counts[e]`` with ``sum(counts) == num_slots``, counts >= 1.

    Input ``weight [B, n]``; output ``[B]`` float64. Computed from the optimal greedy counts.
    """
    counts = replicate_greedy(weight, num_slots)
    return (weight / counts).max(-1).values


def replicate_divisor(weight: torch.Tensor, num_slots: int, cap: int | None = None, delta: float = 0.0) -> torch.Tensor:
    """Divisor-method replica counts: each extra slot goes to the expert with the largest ``load / (count + delta)``.

    ``delta = 0`` and ``cap = None`` is exactly :func:`replicate_greedy`. ``delta < 0`` (> -1) favours
    experts with few replicas (hot experts get fewer, larger replicas, more experts get a second one);
    ``delta > 0`` favours hot experts. ``cap``: an expert stops receiving replicas at ``cap`` of them,
    normally the number of GPUs they can spread over: ``c > cap`` replicas put at least
    ``ceil(c / cap)`` on one GPU, i.e. ``load * ceil(c/cap) / c >= load / cap`` there, so such a
    replica cannot lower that GPU's share and is better spent on another expert. When every expert is
    capped the extra slots ignore the cap.
    ``weight [B, n]`` -> ``counts [B, n]`` int64 (>= 1, rows sum to ``num_slots``).
    """
    B, n = weight.shape
    counts = torch.ones(B, n, dtype=torch.int64)  # [B, n]
    rows = torch.arange(B)
    score = weight / (1.0 + delta)  # [B, n] priority of the next replica
    ninf = torch.tensor(float("-inf"), dtype=weight.dtype)
    for _ in range(num_slots - n):
        if cap is None:
            e = score.argmax(-1)  # [B]
        else:
            open_ = counts < cap  # [B, n]
            e = torch.where(open_ | ~open_.any(-1, keepdim=True), score, ninf).argmax(-1)
        counts[rows, e] += 1
        score[rows, e] = weight[rows, e] / (counts[rows, e] + delta)
    return counts
