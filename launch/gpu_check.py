"""GPU checks of the fast path: correctness of the bf16 MoE layer against a float64
reference, and where the time of one forward goes (CUDA events per phase).

    python launch/gpu_check.py            # needs a CUDA GPU; world of one
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.config import MoEConfig  # noqa: E402
from moe_ep.experts import init_expert_weights, silu_gate, swiglu  # noqa: E402
from moe_ep.layer import MoELayer  # noqa: E402
from moe_ep.parallel import ParallelContext  # noqa: E402
from moe_ep.timing import PhaseTimer  # noqa: E402


@torch.no_grad()
def reference_fp64(layer: MoELayer, x: torch.Tensor, weights) -> torch.Tensor:
    """Every token through its chosen experts in float64 (same routing as the layer)."""
    w, ids = layer.router(x)
    xd = x.double()
    out = torch.zeros_like(xd)
    for e in range(layer.cfg.num_experts):
        tok, j = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            w13, w2 = (t.double() for t in weights(e))
            out.index_add_(0, tok, swiglu(xd[tok], w13, w2) * w[tok, j].double().unsqueeze(-1))
    return out


def check_correctness(device) -> list[dict]:
    rows = []
    ctx = ParallelContext(device=device)
    for T, H, Fh, E, k in [(1000, 512, 384, 64, 8), (4096, 1024, 768, 64, 8), (333, 256, 128, 16, 1)]:
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden_size=Fh)
        layer = MoELayer(H, cfg, ctx, dtype=torch.bfloat16)
        fn = lambda e: init_expert_weights(0, 0, e, H, Fh, torch.bfloat16, device)  # noqa: E731
        layer.load_expert_weights(fn)
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        out = layer(x)
        ref = reference_fp64(layer, x, fn)
        rel = float((out.double() - ref).norm() / ref.norm())
        rows.append({"tokens": T, "hidden": H, "experts": E, "top_k": k, "rel_err_bf16_vs_fp64": rel,
                     "finite": bool(torch.isfinite(out).all())})
    return rows


def phase_breakdown(device, T=8192, H=4096, Fh=3072, E=64, k=8, iters=10, activation=None) -> dict:
    ctx = ParallelContext(device=device)
    torch.manual_seed(0)
    layer = MoELayer(H, MoEConfig(num_experts=E, top_k=k, expert_hidden_size=Fh), ctx, dtype=torch.bfloat16)
    layer.router.gate.weight.data.normal_(std=0.02)
    layer.load_expert_weights(lambda e: init_expert_weights(0, 0, e, H, Fh, torch.bfloat16, device))
    if activation is not None:
        layer.experts.activation = activation
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        layer(x)
    layer.timer = PhaseTimer(device)
    totals = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        layer(x)
        end.record()
        torch.cuda.synchronize()
        totals.append(start.elapsed_time(end))
    phases = {name: ms / iters for name, ms in layer.timer.collect().items()}
    flops = 2 * 3 * T * k * H * Fh
    med = statistics.median(totals)
    return {"median_ms": med, "phases_ms": phases, "expert_tflops": flops / (phases["experts"] * 1e-3) / 1e12,
            "layer_tflops": flops / (med * 1e-3) / 1e12}


def main():
    device = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(device), "torch", torch.__version__)
    result = {"correctness": check_correctness(device)}
    # A/B in one process: the SiLU-gate as separate kernels vs fused by torch.compile (the default).
    for name, act in [("eager", silu_gate), ("compiled", None), ("eager again", silu_gate), ("compiled again", None)]:
        result[f"phases ({name} activation)"] = phase_breakdown(device, activation=act)
    print(json.dumps(result, indent=1))
    bad = [r for r in result["correctness"] if not (r["finite"] and r["rel_err_bf16_vs_fp64"] < 1e-2)]
    if bad:
        print("FAILED: bf16 error above 1e-2:", bad)
        sys.exit(1)


if __name__ == "__main__":
    main()
