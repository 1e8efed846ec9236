"""Which grouped-GEMM layouts do the most real work per second once the GPU sits at its power
limit? Each variant is timed in a burst (50 ms idle before each call, full SM clock) and
sustained (back to back for 2 s, power-limited clock), and its speed is given in TFLOP/s of the
*real* rows (65536 = 8192 tokens x top-8), so padding counts as overhead.

    python launch/gpu_power_probe.py [--json out.json]        # one Hopper GPU

Variants of the gate/up GEMM (x [65536, 4096] -> SwiGLU [65536, 3072], 64 slots) and the down
GEMM (-> [65536, 4096], routed weight in the epilogue):
  * "packed": slots back to back (today's layout); a slot's last tile reads the next slot's rows;
  * "padded, zero rows": every slot starts on a 128-row tile boundary, the padding rows are zeros;
  * "padded, random rows": the same layout with random padding rows (separates the layout from
    the data: tensor cores draw less power on zeros);
plus gathering rows on load instead of copying them first, torch._grouped_mm, and the dense
8192^3 GEMM on random and on zero inputs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_profile import sustained_vs_burst  # noqa: E402
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.kernels import grouped_gemm as gg  # noqa: E402


def padded_layout(counts: torch.Tensor, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [S] -> (padded counts [S] (multiples of bm), dest [M] row of each packed row)."""
    pad = (counts + bm - 1) // bm * bm
    starts = pad.cumsum(0) - pad
    packed_starts = counts.cumsum(0) - counts
    slot = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    dest = starts[slot] + torch.arange(int(counts.sum()), device=counts.device) - packed_starts[slot]
    return pad, dest


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    T, H, Fh, S, k = 8192, 4096, 3072, 64, 8
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    slots = torch.randint(0, S, (T * k,), device=dev)
    order = torch.argsort(slots, stable=True)
    counts = torch.bincount(slots, minlength=S)
    ri = order // k                                                         # [M] token of each packed row
    M = ri.numel()
    xs = x[ri]                                                              # [M, H] packed copy
    w13 = torch.randn(S, H, 2 * Fh, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(S, Fh, H, device=dev, dtype=torch.bfloat16) * Fh ** -0.5
    scale = torch.rand(M, device=dev)
    up, down = gg.GATE_UP_CONFIG, gg.DOWN_CONFIG
    pad, dest = padded_layout(counts, up.BM)
    Mp = int(pad.sum())
    x_zero = torch.zeros(Mp, H, device=dev, dtype=torch.bfloat16)
    x_zero[dest] = xs
    x_rand = torch.randn(Mp, H, device=dev, dtype=torch.bfloat16)
    x_rand[dest] = xs
    h = gg.grouped_gemm(xs, w13, counts, swiglu=True)                        # [M, F]
    h_zero = torch.zeros(Mp, Fh, device=dev, dtype=torch.bfloat16)
    h_zero[dest] = h
    h_rand = torch.randn(Mp, Fh, device=dev, dtype=torch.bfloat16)
    h_rand[dest] = h
    scale_p = torch.zeros(Mp, device=dev)
    scale_p[dest] = scale
    import dataclasses
    gather_cfg = dataclasses.replace(up, gather_on_load=True)
    f1, f2 = 2 * M * H * 2 * Fh, 2 * M * Fh * H
    offs = counts.cumsum(0).to(torch.int32)
    offs_p = pad.cumsum(0).to(torch.int32)
    D = 8192
    a = torch.randn(D, D, device=dev, dtype=torch.bfloat16)
    z = torch.zeros(D, D, device=dev, dtype=torch.bfloat16)
    cases = {
        "dense 8192^3, random": (lambda: a @ a, 2 * D ** 3),
        "dense 8192^3, zeros": (lambda: z @ z, 2 * D ** 3),
        "gate/up packed, rows copied first (default)": (lambda: gg.grouped_gemm(x, w13, counts, swiglu=True, row_index=ri), f1),
        "gate/up packed, x already permuted": (lambda: gg.grouped_gemm(xs, w13, counts, swiglu=True), f1),
        "gate/up packed, rows gathered on load": (lambda: gg.grouped_gemm(x, w13, counts, swiglu=True, row_index=ri,
                                                                          config=gather_cfg), f1),
        "gate/up padded, zero rows": (lambda: gg.grouped_gemm(x_zero, w13, pad, swiglu=True), f1),
        "gate/up padded, random rows": (lambda: gg.grouped_gemm(x_rand, w13, pad, swiglu=True), f1),
        "gate/up torch._grouped_mm packed (no SwiGLU)": (lambda: torch._grouped_mm(xs, w13, offs=offs), f1),
        "gate/up torch._grouped_mm padded zero rows (no SwiGLU)": (lambda: torch._grouped_mm(x_zero, w13, offs=offs_p), f1),
        "padded row copy (zeros + scatter)": (lambda: torch.zeros(Mp, H, device=dev, dtype=torch.bfloat16).index_copy_(0, dest, xs), 0),
        "down packed (default)": (lambda: gg.grouped_gemm(h, w2, counts, row_scale=scale), f2),
        "down padded, zero rows": (lambda: gg.grouped_gemm(h_zero, w2, pad, row_scale=scale_p), f2),
        "down padded, random rows": (lambda: gg.grouped_gemm(h_rand, w2, pad, row_scale=scale_p), f2),
    }
    # the padded outputs hold the packed ones at `dest` (same kernels, same sums)
    check = {"gate/up padded zero vs packed": float((gg.grouped_gemm(x_zero, w13, pad, swiglu=True)[dest].float()
                                                    - h.float()).abs().max()),
             "padded rows / real rows": f"{Mp} / {M}"}
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "check": check, "cases": {}}
    print(check)
    for name, (fn, flops) in cases.items():
        r = sustained_vs_burst(fn, max(flops, 1))
        res["cases"][name] = r
        print(f"{name:58s} burst {r['burst_ms']:7.3f} ms {r['burst_tflops'] if flops else 0:5.0f} TF "
              f"@{r['burst_sm_mhz']} | sustained {r['sustained_ms']:7.3f} ms "
              f"{r['sustained_tflops'] if flops else 0:5.0f} TF @{r['sustained_sm_mhz']}", flush=True)
    if args.json:
        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
