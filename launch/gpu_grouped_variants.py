"""Times torch._grouped_mm for the expert GEMMs with both weight layouts, and the SiLU-gate step.

    python launch/gpu_grouped_variants.py     # one GPU
"""
import statistics

import torch
import torch.nn.functional as F

dev = torch.device("cuda")
S, H, Fh, M = 64, 4096, 3072, 65536
x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
counts = torch.full((S,), M // S, device=dev)
counts[0] += M - int(counts.sum())
offs = counts.cumsum(0).to(torch.int32)
w13_kn = torch.randn(S, H, 2 * Fh, device=dev, dtype=torch.bfloat16) * H ** -0.5        # [S, K, N]
w13_nk = w13_kn.transpose(1, 2).contiguous()                                          # [S, N, K]
w2_kn = torch.randn(S, Fh, H, device=dev, dtype=torch.bfloat16) * Fh ** -0.5
w2_nk = w2_kn.transpose(1, 2).contiguous()
h = torch.randn(M, Fh, device=dev, dtype=torch.bfloat16)
g = torch.randn(M, 2 * Fh, device=dev, dtype=torch.bfloat16)


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def silu_gate(t):
    gate, up = t.chunk(2, dim=-1)
    return F.silu(gate) * up


silu_gate_c = torch.compile(silu_gate)
flops1, flops2 = 2 * M * H * 2 * Fh, 2 * M * Fh * H
ref = torch._grouped_mm(x, w13_kn, offs=offs).float()
for name, fn, fl in [
    ("w13 [S,K,N] contiguous", lambda: torch._grouped_mm(x, w13_kn, offs=offs), flops1),
    ("w13 [S,N,K]^T (K-major)", lambda: torch._grouped_mm(x, w13_nk.transpose(1, 2), offs=offs), flops1),
    ("w2 [S,K,N] contiguous", lambda: torch._grouped_mm(h, w2_kn, offs=offs), flops2),
    ("w2 [S,N,K]^T (K-major)", lambda: torch._grouped_mm(h, w2_nk.transpose(1, 2), offs=offs), flops2),
    ("silu-gate eager", lambda: silu_gate(g), 0),
    ("silu-gate compiled", lambda: silu_gate_c(g), 0),
]:
    ms = bench(fn)
    print(f"{name:28s} {ms:7.3f} ms" + (f"  {fl / ms / 1e9:6.0f} TFLOP/s" if fl else ""))
alt = torch._grouped_mm(x, w13_nk.transpose(1, 2), offs=offs).float()
print("layouts agree:", float((alt - ref).norm() / ref.norm()))
