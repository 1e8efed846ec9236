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
