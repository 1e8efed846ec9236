"""The EP = 1 forward path: every routed copy stays on this rank, so nothing is exchanged.

Index math is one stable counting sort (no argsort, no inverse permutation) that also writes
each slot-grouped row's token index and routed weight; the experts take the tokens and that
index (their Triton kernels can gather rows while loading them; copying them first measured
faster on the H200); the routed weight is applied in the down GEMM's epilogue; and the
combine is a plain gather + sum per token in one kernel (the shared expert's output folded in). No step reads a value back to
the host, so the layer can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .placement import count_per_bin
from .router import RoutedCopies

# Above this many key x bin cells the one-hot counting sort would take too much memory
# (int32 cells); a stable argsort does the same job there.
_ONE_HOT_LIMIT = 1 << 25


def _triton_sort(keys: torch.Tensor, num_bins: int) -> bool:
    """The Triton counting sort runs here: CUDA, and few enough bins for a one-hot block in registers."""
    from . import kernels
    return keys.is_cuda and num_bins <= 256 and kernels.available(keys.device)


def counting_sort(keys: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort by small integer keys without sorting: keys [N] in [0, num_bins) ->
    (pos [N] int64: where element i lands in the sorted order, counts [num_bins] int64).

    pos[i] = (elements with a smaller key) + (earlier elements with the same key), read off
    a running count of a [N, num_bins] one-hot matrix (Triton, block by block, on CUDA;
    torch on CPU). No host sync.
    """
    N = keys.numel()
    if _triton_sort(keys, num_bins):
        from .kernels.sort import counting_sort_cuda
        return counting_sort_cuda(keys, num_bins)
    if N * num_bins > _ONE_HOT_LIMIT:
        order = torch.argsort(keys, stable=True)                               # [N]
        pos = torch.empty_like(order)
        pos[order] = torch.arange(N, device=keys.device)
        return pos, count_per_bin(keys, num_bins)
    one_hot = torch.zeros(N, num_bins, dtype=torch.int32, device=keys.device)  # [N, bins]
    one_hot.scatter_(1, keys.view(N, 1), 1)
    running = one_hot.cumsum(0, dtype=torch.int32)                              # [N, bins]
    counts = (running[-1] if N else one_hot.sum(0)).to(torch.int64)            # [bins]
    rank = running.gather(1, keys.view(N, 1)).view(N).to(torch.int64) - 1      # [N] among equal keys
    starts = counts.cumsum(0) - counts                                         # [bins]
    return starts[keys] + rank, counts


@dataclass
class LocalPlan:
    """Where each copy's row goes at EP = 1."""

    pos: torch.Tensor         # [N] row of the slot-grouped expert input/output holding copy i
    row_index: torch.Tensor   # [N] input row (token) of each slot-grouped row
    row_scale: torch.Tensor   # [N] float32 routed weight of each slot-grouped row
    counts: torch.Tensor      # [S] rows per slot


def local_dispatch(slots: torch.Tensor, copies: RoutedCopies, num_slots: int) -> LocalPlan:
    """slots [N] (slot of copy i) -> the plan: copies grouped by slot, in copy order within a slot
    (the same order a stable argsort gives)."""
    if _triton_sort(slots, num_slots):  # one pass also writes row_index and row_scale
        from .kernels.sort import counting_sort_cuda
        if copies.token is None:
            pos, counts, row_index, row_scale = counting_sort_cuda(slots, num_slots, top_k=copies.top_k,
                                                                   weights=copies.weight)
        else:
            pos, counts, row_index, row_scale = counting_sort_cuda(slots, num_slots, rows=copies.token,
                                                                   weights=copies.weight)
        return LocalPlan(pos, row_index, row_scale, counts)
    pos, counts = counting_sort(slots, num_slots)                              # [N], [S]
    row_index = torch.empty_like(pos)
    row_index[pos] = copies.rows()                                             # [N]
    row_scale = torch.empty(pos.numel(), dtype=torch.float32, device=pos.device)
    row_scale[pos] = copies.weight.float()                                     # [N]
    return LocalPlan(pos, row_index, row_scale, counts)


def _triton_combine(y: torch.Tensor) -> bool:
    from . import kernels
    return y.is_cuda and kernels.available(y.device)


def local_combine(y: torch.Tensor, copies: RoutedCopies, plan: LocalPlan,
                  shared: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum each token's (already weighted) expert rows: y [N, H] slot-grouped -> [T, H].

    shared [T, H] (optional) is added (the shared expert's output). A token that no expert
    chose gets zeros (plus shared).
    """
    T, H = copies.num_tokens, y.shape[1]
    if copies.token is None:                       # k copies per token, copy t*k + j
        k = copies.top_k
        if _triton_combine(y):
            from .kernels.combine import gather_sum
            return gather_sum(y, plan.pos, T, top_k=k, init=shared)
        out = y[plan.pos].view(T, k, H).sum(1)                                 # [T, H]
    else:                                          # 0..E copies per token
        if _triton_combine(y):
            from .kernels.combine import gather_sum
            by_token, per_token = counting_sort(copies.token, T)               # [N], [T]
            src = torch.empty_like(plan.pos)
            src[by_token] = plan.pos                                           # [N] y row, copies in token order
            offsets = torch.zeros(T + 1, dtype=torch.int64, device=y.device)
            offsets[1:] = per_token.cumsum(0)                                  # [T+1] CSR
            return gather_sum(y, src, T, offsets=offsets, init=shared)
        out = y.new_zeros(T, H).index_add_(0, plan.row_index, y)              # [T, H]
    return out if shared is None else out + shared
