"""Triton grouped GEMMs for the routed experts (one launch per GEMM, no host sync).

Rows of the grouped input are grouped by slot: slot s owns rows [start_s, start_s + counts[s]).
Each program computes one [BM, BN] output tile of one slot. Tiles are numbered slot by slot;
the grid is sized from the static bound  cdiv(M, BM) + S  (every slot wastes at most one
partial tile), and each program finds its slot from `counts` itself (a cumulative sum over
S <= 1024 values in registers), so there is no host sync and no extra index kernel: the
layer stays capturable in a CUDA graph.

Two GEMMs, each with its epilogue fused:
  * gate/up:  h = silu(x @ W13[:, :F]) * (x @ W13[:, F:])   x [M, H] (optionally gathered:
    row i is x[row_index[i]], so the permuted copy of x is never written), W13 [S, H, 2F]
    -> h [M, F]. Gate and up tiles are two accumulators of one program.
  * down:     y = (h @ W2) * row_scale[:, None]             h [M, F], W2 [S, F, H] -> [M, H]
    (the routed weight applied in fp32 before rounding, so the combine is a plain sum).

Two ways to load tiles: plain pointer loads (cp.async pipelined by Triton; needed for a
gathered A) and Hopper TMA descriptors (`desc=True`, sm90+: the weights, and A unless it is
gathered on load). With a row index and `gather_on_load=False` the rows are copied first
(x[row_index]) and then loaded by TMA: on the H200 that was the faster of the two.
A persistent TMA kernel (`persistent=True`: one program per SM walks the tiles) is kept for
measurement and off: it made gate/up 30% slower and the layer no faster (docs/benchmarks.md 1d,
round 5).

Batch invariance (moe_ep/batch_invariant.py): a row's result does not depend on the other rows of
the launch. Each GEMM runs one fixed configuration for its weights' shape (kernels/gemm_configs.py:
chosen per (K, N, dtype, GPU), never from M, the counts or the slot count; no autotuning), each
output tile is one program that walks the whole K dimension in BK steps in the same order (no split-K, no reduction across programs), and the kernel
choice (TMA or pointer loads) depends on K, N, the dtype and the GPU only. A row's tile-mates are
computed and masked, never mixed into it. Keep it so: a config picked per token count would make
the images depend on the batch and the EP size. (Argued from the code; no GPU here to measure.)
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


from .gemm_configs import GemmConfig, capability


@triton.jit
def _slot_of_tile(counts_ptr, S, pid_m, BM: tl.constexpr, S_P2: tl.constexpr):
    """(slot, its first row, its row count, tile index inside the slot) of M-tile `pid_m`.

    slot == S means the tile is past the last slot's rows (the program has nothing to do).
    """
    offs = tl.arange(0, S_P2)
    c = tl.load(counts_ptr + offs, mask=offs < S, other=0).to(tl.int32)      # [S_P2] rows per slot
    tiles = (c + BM - 1) // BM                                               # [S_P2] tiles per slot
    tile_end = tl.cumsum(tiles, 0)                                           # inclusive
    slot = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    pick = offs == slot
    count = tl.sum(tl.where(pick, c, 0), 0)
    row_start = tl.sum(tl.where(pick, tl.cumsum(c, 0) - c, 0), 0)
    local_m = pid_m - tl.sum(tl.where(pick, tile_end - tiles, 0), 0)
    return slot, row_start, count, local_m


@triton.jit
def _swizzle(pid, TM, NT, GROUP_M: tl.constexpr):
    """Tile number -> (M-tile, N-tile): GROUP_M consecutive M-tiles (about one slot's rows)
    sweep all N-tiles together, so a slot's weight columns are read from HBM about once."""
    in_group = GROUP_M * NT
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(TM - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _store_tile(acc, acc_up, c_ptr, scale_ptr, row_start, local_m, count, n0, N, stride_cm,
                BM: tl.constexpr, BN: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr):
    """The epilogue of one [BM, BN] tile: silu(acc) * acc_up (SWIGLU), times each row's fp32 scale
    (SCALE), stored in c's dtype. Rows past the slot's `count` and columns past N are not written."""
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    offs_m = local_m * BM + tl.arange(0, BM)
    row_ok = offs_m < count
    out_rows = (row_start + offs_m).to(tl.int64)
    offs_n = n0 + tl.arange(0, BN)
    if SCALE:
        acc = acc * tl.load(scale_ptr + out_rows, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + out_rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < N)[None, :])


@triton.jit
def _grouped_kernel(a_ptr, row_index_ptr, b_ptr, c_ptr, scale_ptr, counts_ptr,
                    M, N, K, S, TM, B_COL_UP,
                    stride_am, stride_bs, stride_bk, stride_cm,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    S_P2: tl.constexpr, SWIGLU: tl.constexpr, GATHER: tl.constexpr, SCALE: tl.constexpr,
                    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """Pointer-load grouped GEMM. C [M, N] (rows grouped by slot) = epilogue(A_s @ B_s).

    SWIGLU: B_s is [K, 2N'] with the up columns at B_COL_UP; C = silu(A@Bg) * (A@Bu).
    GATHER: A row i is a_ptr row row_index[i]. SCALE: C rows times scale[i] (fp32).
    """
    NT = tl.cdiv(N, BN)
    pid_m, pid_n = _swizzle(tl.program_id(0), TM, NT, GROUP_M)
    slot, row_start, count, local_m = _slot_of_tile(counts_ptr, S, pid_m, BM, S_P2)
    if slot >= S:
        return
    offs_m = local_m * BM + tl.arange(0, BM)                                 # [BM] row inside the slot
    rows = row_start + tl.minimum(offs_m, count - 1)                         # clamped: loads stay in bounds
    if GATHER:
        a_rows = tl.load(row_index_ptr + rows).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]           # [BM, BK]
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    b_ptrs = b_base + offs_k[:, None] * stride_bk + offs_n[None, :]          # [BK, BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = acc                                                             # (unused without SWIGLU)
    if SWIGLU:
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    n_ok = offs_n < N
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        if EVEN_K and EVEN_N:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k0) & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        if SWIGLU:
            if EVEN_K and EVEN_N:
                bu = tl.load(b_ptrs + B_COL_UP)
            else:
                bu = tl.load(b_ptrs + B_COL_UP, mask=(offs_k[:, None] < K - k0) & n_ok[None, :], other=0.0)
            acc_up = tl.dot(a, bu, acc_up)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    _store_tile(acc, acc_up, c_ptr, scale_ptr, row_start, local_m, count, pid_n * BN, N, stride_cm,
                BM, BN, SWIGLU, SCALE)


@triton.jit
def _grouped_tma_kernel(a_desc, a_ptr, row_index_ptr, b_desc, c_ptr, scale_ptr, counts_ptr,
                        M, N, K, S, TM, B_COL_UP, stride_am, stride_cm,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        S_P2: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr, GATHER: tl.constexpr,
                        NUM_STAGES: tl.constexpr, WS: tl.constexpr):
    """TMA-descriptor grouped GEMM (Hopper): B as a [S*K, Ncols] 2-D descriptor; A [M, K] as a
    descriptor too, or (GATHER) by pointer loads of rows a[row_index[i]] (TMA cannot gather rows).

    An A tile may run past its slot into the next slot's rows (or past M, zero-filled by TMA);
    those rows are computed and not stored. K must be a multiple of BK (checked by the caller).
    """
    NT = tl.cdiv(N, BN)
    pid_m, pid_n = _swizzle(tl.program_id(0), TM, NT, GROUP_M)
    slot, row_start, count, local_m = _slot_of_tile(counts_ptr, S, pid_m, BM, S_P2)
    if slot >= S:
        return
    m0 = row_start + local_m * BM
    n0 = pid_n * BN
    kb = slot * K
    if GATHER:
        offs_m = local_m * BM + tl.arange(0, BM)
        rows = row_start + tl.minimum(offs_m, count - 1)                     # clamped: loads stay in bounds
        a_rows = tl.load(row_index_ptr + rows).to(tl.int64)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + tl.arange(0, BK)[None, :]   # [BM, BK]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = acc                                                             # (unused without SWIGLU)
    if SWIGLU:
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=NUM_STAGES, warp_specialize=WS):
        if GATHER:
            a = tl.load(a_ptrs + k)
        else:
            a = a_desc.load([m0, k])
        acc = tl.dot(a, b_desc.load([kb + k, n0]), acc)
        if SWIGLU:
            acc_up = tl.dot(a, b_desc.load([kb + k, B_COL_UP + n0]), acc_up)
    _store_tile(acc, acc_up, c_ptr, scale_ptr, row_start, local_m, count, n0, N, stride_cm, BM, BN, SWIGLU, SCALE)


@triton.jit
def _grouped_tma_persistent_kernel(a_desc, b_desc, c_ptr, scale_ptr, counts_ptr, N, K, S, B_COL_UP, stride_cm,
                                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                                   S_P2: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr,
                                   NUM_SMS: tl.constexpr):
    """The TMA kernel made persistent: the programs walk the tiles with stride NUM_SMS, and Triton
    flattens the tile and K loops into one software pipeline, so a tile's loads start while the
    previous tile's epilogue runs. Only real tiles are visited: their number comes from `counts`
    (so the last GROUP_M group is cut at the real M-tile count, not at the launch bound)."""
    offs = tl.arange(0, S_P2)
    c = tl.load(counts_ptr + offs, mask=offs < S, other=0).to(tl.int32)      # [S_P2]
    TM = tl.sum((c + BM - 1) // BM, 0)                                        # real M-tiles
    NT = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), TM * NT, NUM_SMS, flatten=True):
        pid_m, pid_n = _swizzle(tile, TM, NT, GROUP_M)
        slot, row_start, count, local_m = _slot_of_tile(counts_ptr, S, pid_m, BM, S_P2)
        m0 = row_start + local_m * BM
        n0 = pid_n * BN
        kb = slot * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = acc                                                         # (unused without SWIGLU)
        if SWIGLU:
            acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = a_desc.load([m0, k])
            acc = tl.dot(a, b_desc.load([kb + k, n0]), acc)
            if SWIGLU:
                acc_up = tl.dot(a, b_desc.load([kb + k, B_COL_UP + n0]), acc_up)
        _store_tile(acc, acc_up, c_ptr, scale_ptr, row_start, local_m, count, n0, N, stride_cm,
                    BM, BN, SWIGLU, SCALE)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, *, swiglu: bool = False,
                 row_index: Optional[torch.Tensor] = None, row_scale: Optional[torch.Tensor] = None,
                 config: GemmConfig = GemmConfig(), out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One grouped GEMM with a fused epilogue.

    a [Ma, K] (rows grouped by slot; with row_index [M], row i of the group input is a[row_index[i]]),
    b [S, K, Nb] (slot weights), counts [S] (rows per slot, on a's device, sum = M),
    row_scale [M] fp32 or None. Returns [M, N] in a's dtype, N = Nb // 2 with swiglu else Nb.
    """
    S, K, Nb = b.shape
    M = row_index.numel() if row_index is not None else a.shape[0]
    if a.shape[1] != K:
        raise ValueError(f"a has {a.shape[1]} columns, the weights {K} rows")
    if swiglu and Nb % 2:
        raise ValueError(f"swiglu needs an even number of weight columns, got {Nb}")
    N = Nb // 2 if swiglu else Nb
    c = out if out is not None else a.new_empty(M, N)                          # [M, N]
    if M == 0:
        return c
    a = a.contiguous()
    b = b.contiguous()
    cfg = config
    TM = triton.cdiv(M, cfg.BM) + S                    # static bound on M-tiles: no host sync
    grid = (TM * triton.cdiv(N, cfg.BN),)
    scale = row_scale if row_scale is not None else c  # dummy pointer when unused
    if row_index is not None and not cfg.gather_on_load:
        a, row_index = a[row_index], None                                     # [M, K] permuted copy
    tma_ok = not a.is_cuda or capability(a.device)[0] >= 9                # CPU: the interpreter
    # TMA needs 16-byte aligned row strides and column offsets (the up half starts at column N)
    aligned = K % cfg.BK == 0 and (Nb * b.element_size()) % 16 == 0 and (N * b.element_size()) % 16 == 0
    if cfg.desc and tma_ok and aligned and TensorDescriptor is not None:
        gather = row_index is not None
        a_desc = a if gather else TensorDescriptor.from_tensor(a, [cfg.BM, cfg.BK])
        b_desc = TensorDescriptor.from_tensor(b.view(S * K, Nb), [cfg.BK, cfg.BN])
        if cfg.persistent and not gather:
            sms = _num_sms(a.device) if a.is_cuda else 4         # the interpreter: a few programs
            # NUM_SMS is the loop's stride; with fewer tiles than SMs each program has one or none
            _grouped_tma_persistent_kernel[(min(sms, grid[0]),)](
                a_desc, b_desc, c, scale, counts, N, K, S, N if swiglu else 0, c.stride(0),
                BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, S_P2=_next_pow2(S), SWIGLU=swiglu,
                SCALE=row_scale is not None, NUM_SMS=sms, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return c
        _grouped_tma_kernel[grid](a_desc, a, row_index if gather else counts, b_desc, c, scale, counts,
                                  M, N, K, S, TM, N if swiglu else 0, a.stride(0), c.stride(0),
                                  BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, S_P2=_next_pow2(S),
                                  SWIGLU=swiglu, SCALE=row_scale is not None, GATHER=gather,
                                  NUM_STAGES=cfg.num_stages, WS=cfg.warp_specialize, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages)
        return c
    idx = row_index if row_index is not None else counts  # dummy pointer when unused
    _grouped_kernel[grid](a, idx, b, c, scale, counts, M, N, K, S, TM, N if swiglu else 0,
                          a.stride(0), b.stride(0), b.stride(1), c.stride(0),
                          BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, S_P2=_next_pow2(S),
                          SWIGLU=swiglu, GATHER=row_index is not None, SCALE=row_scale is not None,
                          EVEN_K=K % cfg.BK == 0, EVEN_N=N % cfg.BN == 0,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return c
