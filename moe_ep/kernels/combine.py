"""Fused combine: gather each token's expert-output rows and sum them, in one pass.

out[t] = sum over copies c of token t of  w[c] * y[src[c]]   (fp32 accumulation)

Copies are given in token order as CSR: token t owns copies offsets[t] .. offsets[t+1]-1
(0..E copies per token, as expert-choice routing gives), or, with `top_k`, exactly k copies
each (copy c = t*k + j). Replaces "gather [T*k, H] rows, then bmm over k": the [T*k, H]
intermediate is never written (one read of y, one write of out).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_sum_kernel(y_ptr, src_ptr, w_ptr, off_ptr, init_ptr, out_ptr, H, stride_y, stride_i, stride_o,
                       TOP_K: tl.constexpr, WEIGHTED: tl.constexpr, INIT: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program: one token, BLOCK_H columns."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    if INIT:
        acc = tl.load(init_ptr + t * stride_i + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if TOP_K > 0:
        for j in tl.static_range(TOP_K):
            c = t * TOP_K + j
            row = tl.load(src_ptr + c).to(tl.int64)
            v = tl.load(y_ptr + row * stride_y + cols, mask=col_ok, other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * tl.load(w_ptr + c)
            acc += v
    else:
        start = tl.load(off_ptr + t)
        end = tl.load(off_ptr + t + 1)
        for c in range(start, end):
            row = tl.load(src_ptr + c).to(tl.int64)
            v = tl.load(y_ptr + row * stride_y + cols, mask=col_ok, other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * tl.load(w_ptr + c)
            acc += v
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def gather_sum(y: torch.Tensor, src: torch.Tensor, num_tokens: int, *, top_k: int = 0,
               offsets: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
               init: Optional[torch.Tensor] = None, block_h: int = 1024) -> torch.Tensor:
    """y [M, H], src [N] (row of y for each copy, copies in token order) -> out [num_tokens, H].

    Either top_k > 0 (N = num_tokens * top_k) or offsets [num_tokens + 1] (CSR). weights [N]
    (fp32) multiply each copy; leave None when they were applied already (row_scale).
    init [num_tokens, H] (optional) is added (e.g. the shared expert's output).
    """
    if (top_k > 0) == (offsets is not None):
        raise ValueError("give exactly one of top_k > 0 or offsets")
    H = y.shape[1]
    out = y.new_empty(num_tokens, H)                                          # [T, H]
    if num_tokens == 0:
        return out
    y = y.contiguous()
    dummy = src
    grid = (num_tokens, triton.cdiv(H, block_h))
    if init is not None:
        init = init.contiguous()
    _gather_sum_kernel[grid](y, src, weights if weights is not None else dummy,
                             offsets if offsets is not None else dummy, init if init is not None else y, out,
                             H, y.stride(0), init.stride(0) if init is not None else 0, out.stride(0),
                             TOP_K=top_k, WEIGHTED=weights is not None, INIT=init is not None,
                             BLOCK_H=block_h, num_warps=4)
    return out
