"""GPU checks of the fast path: correctness of the bf16 MoE layer against a float64
reference (each expert path, token and expert choice, with a shared expert), where the time of
one forward goes (CUDA events per phase), and the layer captured in a CUDA graph.

    python benchmarks/gpu_check.py            # needs a CUDA GPU; world of one
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.config import MoEConfig  # noqa: E402
from moe_ep.experts import init_expert_weights, quack_supported, swiglu  # noqa: E402
from moe_ep.layer import MoELayer  # noqa: E402
from moe_ep.parallel import ParallelContext  # noqa: E402
from moe_ep.timing import PhaseTimer  # noqa: E402


@torch.no_grad()
def reference_fp64(layer: MoELayer, x: torch.Tensor, weights, shared=None) -> torch.Tensor:
    """Every routed copy through its expert in float64 (same routing as the layer), plus the
    shared expert: x [T, H] (or [B, S, H] for expert choice) -> [T, H] float64."""
    copies = layer.router.route(x)
    xd = x.reshape(-1, x.shape[-1]).double()
    rows, w = copies.rows(), copies.weight.double()
    out = torch.zeros_like(xd)
    for e in range(layer.cfg.num_experts):
        sel = torch.nonzero(copies.expert == e).flatten()
        if sel.numel():
            w13, w2 = (t.double() for t in weights(e))
            out.index_add_(0, rows[sel], swiglu(xd[rows[sel]], w13, w2) * w[sel].unsqueeze(-1))
    if shared is not None:
        out += swiglu(xd, shared.w13.double(), shared.w2.double())
    return out


PATHS = {  # name -> (experts backend, fused EP = 1 path)
    "quack + fused local": ("quack", True),
    "triton+quack + fused local": ("triton+quack", True),
    "triton + fused local": ("triton", True),
    "grouped_mm + fused local": ("grouped_mm", True),
    "grouped_mm + generic dispatch (before)": ("grouped_mm", False),
    "quack + generic dispatch (the EP > 1 path)": ("quack", False),
}


def active_paths(device) -> list[str]:
    """The paths that run here: the QuACK GEMMs need quack-kernels and a Hopper GPU."""
    quack = quack_supported(device, torch.bfloat16, 4096, 3072)
    return [name for name, (backend, _) in PATHS.items() if quack or "quack" not in backend]


def set_path(layer: MoELayer, name: str) -> None:
    layer.experts.backend, layer.fused_local = PATHS[name]
    if layer.shared is not None:                    # the shared expert's down GEMM follows the path
        layer.shared.quack_down = "quack" in layer.experts.backend


def check_correctness(device) -> list[dict]:
    """bf16 layer vs float64, fresh random inputs per case, output poisoned (NaN) beforehand."""
    rows = []
    ctx = ParallelContext(device=device)
    cases = [(1000, 512, 384, 64, 8, "token_choice", 0), (4096, 1024, 768, 64, 8, "token_choice", 0),
             (333, 256, 128, 16, 1, "token_choice", 0), (2048, 512, 384, 16, 2, "token_choice", 1),
             (2 * 512, 512, 384, 16, 0, "expert_choice", 0)]
    for T, H, Fh, E, k, routing, n_shared in cases:
        cfg = MoEConfig(num_experts=E, top_k=max(k, 1), expert_hidden_size=Fh, routing=routing,
                        num_shared_experts=n_shared)
        for path in active_paths(device):
            seed = list(PATHS).index(path)          # the same seed for a path, with or without quack
            torch.manual_seed(seed)
            layer = MoELayer(H, cfg, ctx, dtype=torch.bfloat16)
            layer.router.gate.weight.data.normal_(std=0.02)
            if layer.shared is not None:
                layer.shared.w13.data.normal_(std=H ** -0.5)
                layer.shared.w2.data.normal_(std=Fh ** -0.5)
            fn = lambda e: init_expert_weights(seed, 0, e, H, Fh, torch.bfloat16, device)  # noqa: E731
            layer.load_expert_weights(fn)
            set_path(layer, path)
            x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
            if routing == "expert_choice":
                x = x.view(2, T // 2, H)
            out = layer(x).reshape(T, H)
            ref = reference_fp64(layer, x, fn, layer.shared)
            rel = float((out.double() - ref).norm() / ref.norm())
            rows.append({"path": path, "tokens": T, "hidden": H, "experts": E, "top_k": k, "routing": routing,
                         "shared": n_shared, "rel_err_bf16_vs_fp64": rel, "finite": bool(torch.isfinite(out).all())})
    return rows


def make_layer(device, T=8192, H=4096, Fh=3072, E=64, k=8):
    ctx = ParallelContext(device=device)
    torch.manual_seed(0)
    layer = MoELayer(H, MoEConfig(num_experts=E, top_k=k, expert_hidden_size=Fh), ctx, dtype=torch.bfloat16)
    layer.router.gate.weight.data.normal_(std=0.02)
    layer.load_expert_weights(lambda e: init_expert_weights(0, 0, e, H, Fh, torch.bfloat16, device))
    return layer, torch.randn(T, H, device=device, dtype=torch.bfloat16)


def phase_breakdown(layer, x, iters=10, T=8192, H=4096, Fh=3072, k=8) -> dict:
    """Median layer time (CUDA events) and mean per-phase times over `iters` forwards."""
    for _ in range(3):
        layer(x)
    layer.timer = PhaseTimer(x.device)
    totals = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        layer(x)
        end.record()
        torch.cuda.synchronize()
        totals.append(start.elapsed_time(end))
    phases = {name: ms / iters for name, ms in layer.timer.collect().items()}
    layer.timer = None
    flops = 2 * 3 * T * k * H * Fh
    med = statistics.median(totals)
    return {"median_ms": med, "phases_ms": phases, "expert_tflops": flops / (phases["experts"] * 1e-3) / 1e12,
            "layer_tflops": flops / (med * 1e-3) / 1e12}


def graph_vs_eager(layer, x, iters=20) -> dict:
    """The EP = 1 layer captured in one CUDA graph and replayed, against eager (same inputs).
    Capture fails on any host sync, so a successful capture is also the no-sync check."""
    def timed(fn):
        ts = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))  # noqa: E702
        return statistics.median(ts)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(x)
    eager_out = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    same = bool(torch.equal(static_out, eager_out))
    return {"eager_ms": timed(lambda: layer(x)), "graph_ms": timed(graph.replay), "graph_equals_eager": same}


def main():
    device = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(device), "torch", torch.__version__)
    result = {"correctness": check_correctness(device)}
    layer, x = make_layer(device)
    # A/B in one process, each path twice, alternating.
    for rep in ("", " again"):
        for path in active_paths(device):
            set_path(layer, path)
            result[f"phases ({path}){rep}"] = phase_breakdown(layer, x)
    fastest = "quack + fused local" if "quack + fused local" in active_paths(device) else "triton + fused local"
    set_path(layer, fastest)
    try:
        result["cuda graph"] = {"path": fastest, **graph_vs_eager(layer, x)}
    except RuntimeError as e:                       # not capturable: say so, keep the other results
        result["cuda graph"] = {"path": fastest, "error": str(e)[:500]}
    print(json.dumps(result, indent=1))
    for r in result["correctness"]:
        print(f"{r['path']:40s} T={r['tokens']:5d} H={r['hidden']:5d} E={r['experts']:3d} k={r['top_k']} "
              f"{r['routing']:13s} shared={r['shared']} rel={r['rel_err_bf16_vs_fp64']:.2e}")
    for name, v in result.items():
        if name.startswith("phases"):
            ph = " ".join(f"{p}={ms:.3f}" for p, ms in v["phases_ms"].items())
            print(f"{name:50s} {v['median_ms']:7.3f} ms  {ph}")
    print("graph:", result["cuda graph"])
    bad = [r for r in result["correctness"] if not (r["finite"] and r["rel_err_bf16_vs_fp64"] < 1e-2)]
    if bad:
        print("FAILED: bf16 error above 1e-2:", bad)
        sys.exit(1)


if __name__ == "__main__":
    main()
