"""Stable counting sort of routed copies by slot, in two Triton passes (no argsort, no host sync).

Pass 1: every block of BLOCK copies counts its keys (a [BLOCK, S] one-hot summed in registers).
Between: an exclusive running sum over blocks (torch, [blocks, S] int32: tiny) plus each key's
global start. Pass 2: every copy's position = its block's start for its key + its rank among
equal keys earlier in the block (a running sum of the one-hot down the block); the same pass
writes the slot-grouped row index and routed weight (what the expert GEMMs read).

The torch one-hot version of the same sort spent 12.5 ms on a [65536, 64] column cumsum on an
H200 (docs/benchmarks.md section 1d); this one is two small launches.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _block_hist_kernel(keys_ptr, hist_ptr, N, S, BLOCK: tl.constexpr, S_P2: tl.constexpr):
    """hist[b, s] = copies of block b with key s."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(keys_ptr + offs, mask=offs < N, other=S_P2).to(tl.int32)       # [BLOCK]
    bins = tl.arange(0, S_P2)
    hot = (k[:, None] == bins[None, :]).to(tl.int32)                            # [BLOCK, S_P2]
    tl.store(hist_ptr + b * S + bins, tl.sum(hot, 0), mask=bins < S)


@triton.jit
def _block_place_kernel(keys_ptr, base_ptr, pos_ptr, rows_ptr, w_ptr, row_index_ptr, row_scale_ptr,
                        N, S, TOP_K: tl.constexpr, HAS_ROWS: tl.constexpr, SCATTER: tl.constexpr,
                        BLOCK: tl.constexpr, S_P2: tl.constexpr):
    """pos[i] = base[b, key_i] + rank of i among block b's copies with key_i; with SCATTER also
    row_index[pos[i]] = input row of copy i, row_scale[pos[i]] = weight[i]."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    k = tl.load(keys_ptr + offs, mask=ok, other=S_P2).to(tl.int32)
    bins = tl.arange(0, S_P2)
    hot = (k[:, None] == bins[None, :]).to(tl.int32)                            # [BLOCK, S_P2]
    rank = tl.sum(tl.cumsum(hot, 0) * hot, 1) - 1                               # [BLOCK]
    base = tl.load(base_ptr + b * S + k, mask=ok, other=0)
    pos = (base + rank).to(tl.int64)
    tl.store(pos_ptr + offs, pos, mask=ok)
    if SCATTER:
        if HAS_ROWS:
            row = tl.load(rows_ptr + offs, mask=ok, other=0)
        else:
            row = offs // TOP_K
        tl.store(row_index_ptr + pos, row.to(tl.int64), mask=ok)
        tl.store(row_scale_ptr + pos, tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32), mask=ok)


def counting_sort_cuda(keys: torch.Tensor, num_bins: int, *, top_k: int = 0, rows: Optional[torch.Tensor] = None,
                       weights: Optional[torch.Tensor] = None, block: int = 256):
    """keys [N] in [0, num_bins) -> (pos [N] int64, counts [num_bins] int64[, row_index [N], row_scale [N]]).

    With `weights` [N] (and `rows` [N] or `top_k`: copy i is row i // top_k) also returns the
    slot-grouped row index (int64) and weight (float32).
    """
    N = keys.numel()
    dev = keys.device
    S_P2 = max(16, triton.next_power_of_2(num_bins))
    nb = max(1, triton.cdiv(N, block))
    hist = torch.empty(nb, num_bins, dtype=torch.int32, device=dev)             # [blocks, S]
    pos = torch.empty(N, dtype=torch.int64, device=dev)
    if N == 0:
        counts = torch.zeros(num_bins, dtype=torch.int64, device=dev)
        empty = (torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float32, device=dev))
        return (pos, counts) + (empty if weights is not None else ())
    _block_hist_kernel[(nb,)](keys, hist, N, num_bins, BLOCK=block, S_P2=S_P2)
    before = hist.cumsum(0, dtype=torch.int32) - hist                           # [blocks, S] exclusive
    counts = hist.sum(0, dtype=torch.int64)                                     # [S]
    starts = (counts.cumsum(0) - counts).to(torch.int32)                        # [S]
    base = (before + starts).contiguous()                                       # [blocks, S]
    scatter = weights is not None
    if scatter:
        row_index = torch.empty(N, dtype=torch.int64, device=dev)
        row_scale = torch.empty(N, dtype=torch.float32, device=dev)
    else:
        row_index = row_scale = pos                                             # unused
    _block_place_kernel[(nb,)](keys, base, pos, rows if rows is not None else keys,
                               weights if scatter else keys, row_index, row_scale, N, num_bins,
                               TOP_K=max(top_k, 1), HAS_ROWS=rows is not None, SCATTER=scatter,
                               BLOCK=block, S_P2=S_P2)
    return (pos, counts, row_index, row_scale) if scatter else (pos, counts)
