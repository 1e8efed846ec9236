"""A CPU stand-in for QuACK's two varlen-M GEMMs (moe_ep/kernels/quack_gemm.py), written out from
what QuACK computes, so the "quack" expert path (w13 stored with its columns interleaved) runs
in CPU tests. benchmarks/gpu_check.py checks the real kernels on a GPU against float64 (the QuACK probe
of docs/benchmarks.md 1d, rounds 6 and 7, checked them against the Triton kernels, bit for bit).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def gate_up_gemm(x, w13_pairs, cu):
    """QuACK's gated SwiGLU GEMM: per slot s, acc = x_s @ W_s; column 2j is gate j, 2j + 1 up j."""
    out = []
    for s in range(w13_pairs.shape[0]):
        acc = x[cu[s]:cu[s + 1]].float() @ w13_pairs[s].float()               # [rows, 2F]
        out.append(F.silu(acc[:, 0::2]) * acc[:, 1::2])                        # [rows, F]
    return torch.cat(out).to(x.dtype)


def down_gemm(h, w2, cu, row_scale=None):
    """y_s = h_s @ W2_s, each row times its fp32 scale before rounding."""
    y = torch.cat([h[cu[s]:cu[s + 1]].float() @ w2[s].float() for s in range(w2.shape[0])])
    if row_scale is not None:
        y = y * row_scale.float()[:, None]
    return y.to(h.dtype)


@contextlib.contextmanager
def quack_on_cpu():
    """Inside: the "quack" backend's GEMMs are the stand-ins above."""
    from moe_ep.kernels import quack_gemm
    saved = quack_gemm.gate_up_gemm, quack_gemm.down_gemm
    quack_gemm.gate_up_gemm, quack_gemm.down_gemm = gate_up_gemm, down_gemm
    try:
        yield
    finally:
        quack_gemm.gate_up_gemm, quack_gemm.down_gemm = saved
