"""Grouped-GEMM configurations at the issue's shapes (issue 31 part 4), one GPU, one run.

    python benchmarks/gemm_variants.py [anchor hidream-4k hidream-8k hidream-16k]   # or: gpu_runs.sh gemm-variants

For each shape (the anchor: 8192 tokens, 64 experts, top-8, hidden 4096 / 3072; HiDream-I1's routed
experts: 4 experts, top-2, 2560 / 6912, at 4096 / 8192 / 16384 tokens): the whole layer eager, queued
back to back and in a CUDA graph; the gate/up (SwiGLU epilogue) and down GEMMs alone with the shipped
configurations ("cur": `config_for`'s pick at the shape; "default": GATE_UP_CONFIG, DOWN_CONFIG) and a few others, interleaved over two rounds (clocks
drift) and the best of the two kept; `torch._grouped_mm` without the fused epilogues; the row copy;
a dense mm of the same FLOPs. Writes ${OUT:-.}/gemm_variants.json.

A configuration may only be chosen per (K, N, dtype, GPU), never per row count: grouped_gemm.py's
batch-invariance argument rests on that.
"""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def ev_time(fn, iters: int = 20, warm: int = 5) -> float:
    """Median milliseconds of `fn` alone (CUDA events, a sync after each)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("gemm_variants.py needs a CUDA GPU (Triton grouped GEMMs)", file=sys.stderr)
        return 2
    from bench import back_to_back_ms, layer_graph   # benchmarks/bench.py, beside this script
    from moe_ep.atomic import write_json_atomic
    from moe_ep.config import MoEConfig
    from moe_ep.experts import init_expert_weights
    from moe_ep.kernels.grouped_gemm import DOWN_CONFIG, GATE_UP_CONFIG, GemmConfig, config_for, grouped_gemm
    from moe_ep.layer import MoELayer
    from moe_ep.parallel import ParallelContext

    dev = torch.device("cuda")
    SHAPES = [("anchor", 8192, 64, 8, 4096, 3072, True), ("hidream-4k", 4096, 4, 2, 2560, 6912, False),
              ("hidream-8k", 8192, 4, 2, 2560, 6912, False), ("hidream-16k", 16384, 4, 2, 2560, 6912, False)]
    only = sys.argv[1:] or [s[0] for s in SHAPES]
    GU = {"cur": GATE_UP_CONFIG, "default": GATE_UP_CONFIG,
          "s3": GemmConfig(128, 128, 64, 8, 8, 3, desc=True, gather_on_load=False),
          "g16": GemmConfig(128, 128, 64, 16, 8, 4, desc=True, gather_on_load=False),
          "g4": GemmConfig(128, 128, 64, 4, 8, 4, desc=True, gather_on_load=False),
          "bn64w4": GemmConfig(128, 64, 64, 8, 4, 4, desc=True, gather_on_load=False),
          "bn64w4s6": GemmConfig(128, 64, 64, 8, 4, 6, desc=True, gather_on_load=False),
          "ws": GemmConfig(128, 128, 64, 8, 8, 4, desc=True, gather_on_load=False, warp_specialize=True)}
    DN = {"cur": DOWN_CONFIG, "default": DOWN_CONFIG,
          "s4": GemmConfig(128, 256, 64, 8, 8, 4, desc=True),
          "bn128": GemmConfig(128, 128, 64, 8, 8, 4, desc=True),
          "bn128w4": GemmConfig(128, 128, 64, 8, 4, 4, desc=True),
          "g16": GemmConfig(128, 256, 64, 16, 8, 3, desc=True),
          "g4": GemmConfig(128, 256, 64, 4, 8, 3, desc=True),
          "ws": GemmConfig(128, 256, 64, 8, 8, 3, desc=True, warp_specialize=True)}
    results = {}
    for name, T, E, k, H, F, renorm in SHAPES:
        if name not in only:
            continue
        torch.manual_seed(0)
        ctx = ParallelContext(device=dev)
        cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden_size=F, score_func="softmax", renormalize=renorm)
        layer = MoELayer(H, cfg, ctx, dtype=torch.bfloat16)
        layer.router.gate.weight.data.normal_(std=0.02)
        layer.load_expert_weights(lambda e: init_expert_weights(0, 0, e, H, F, torch.bfloat16, dev))
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        r = {"backend": layer.experts.backend}
        with torch.no_grad():
            f = lambda: layer(x)  # noqa: E731
            r["layer_eager"] = ev_time(f)
            r["layer_queued"] = back_to_back_ms(layer, x, 20)
            replay = layer_graph(layer, x)
            r["layer_graph"] = ev_time(lambda: replay(x))
            # the GEMM inputs
            M = T * k
            _, ids = layer.router(x)
            counts = torch.bincount(ids.reshape(-1), minlength=E).to(torch.int64)
            order = torch.argsort(ids.reshape(-1), stable=True)
            xp = x[order // k].contiguous()
            w13, w2 = layer.experts.w13, layer.experts.w2
            GU["cur"], DN["cur"] = config_for("gate_up", w13), config_for("down", w2)   # the layer's, at this (K, N)
            scale = torch.rand(M, device=dev)
            h = torch.randn(M, F, device=dev, dtype=torch.bfloat16)
            flops_gu, flops_dn = 2 * M * H * 2 * F, 2 * M * F * H
            gu, dn = {}, {}
            def attempt(what, cn, fn):        # a configuration that cannot compile or run: recorded as None
                try:
                    return ev_time(fn)
                except Exception as e:  # noqa: BLE001
                    print(name, what, cn, repr(e)[:200], flush=True)
                    return None

            for _ in range(2):      # interleaved rounds: clocks drift
                for cn, c in GU.items():
                    gu.setdefault(cn, []).append(
                        attempt("gate/up", cn, lambda c=c: grouped_gemm(xp, w13, counts, swiglu=True, config=c)))
                for cn, c in DN.items():
                    dn.setdefault(cn, []).append(
                        attempt("down", cn, lambda c=c: grouped_gemm(h, w2, counts, row_scale=scale, config=c)))
            best = lambda v: min((t for t in v if t is not None), default=None)   # noqa: E731
            r["gate_up"] = {cn: best(v) for cn, v in gu.items()}
            r["down"] = {cn: best(v) for cn, v in dn.items()}
            r["gate_up_tflops_cur"] = flops_gu / r["gate_up"]["cur"] / 1e9
            r["down_tflops_cur"] = flops_dn / r["down"]["cur"] / 1e9
            # torch._grouped_mm, no fused epilogue (A already permuted)
            offs = counts.cumsum(0).to(torch.int32)
            try:
                r["gmm_gate_up"] = ev_time(lambda: torch._grouped_mm(xp, w13, offs=offs))
                r["gmm_down"] = ev_time(lambda: torch._grouped_mm(h, w2, offs=offs))
            except Exception as e:
                print("grouped_mm", repr(e)[:200])
            a = torch.randn(M, H, device=dev, dtype=torch.bfloat16); b = torch.randn(H, 3 * F, device=dev, dtype=torch.bfloat16)
            r["dense_mm_same_flops"] = ev_time(lambda: a @ b)
            r["row_copy"] = ev_time(lambda: x[order // k])
            r["tflop"] = (flops_gu + flops_dn) / 1e12
        results[name] = r
        print(name, json.dumps(r), flush=True)
    out = os.environ.get("OUT", ".")
    write_json_atomic(os.path.join(out, "gemm_variants.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
