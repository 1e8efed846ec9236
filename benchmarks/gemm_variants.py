"""Grouped-GEMM configurations at the issue's shapes (issue 31 part 4), one GPU, one run.

    python benchmarks/gemm_variants.py [anchor hidream-4k hidream-8k hidream-16k]   # or: gpu_runs.sh gemm-variants

For each shape (the anchor: 8192 tokens, 64 experts, top-8, hidden 4096 / 3072; HiDream-I1's routed
experts: 4 experts, top-2, 2560 / 6912, at 4096 / 8192 / 16384 tokens): the whole layer eager, queued
back to back and in a CUDA graph; the gate/up (SwiGLU epilogue) and down GEMMs alone with the shipped
configurations ("cur": `config_for`'s pick at the shape; "default": GATE_UP_CONFIG, DOWN_CONFIG where
they differ) and a few others, interleaved over two rounds (clocks
drift) and the best of the two kept; `torch._grouped_mm` without the fused epilogues; the row copy;
a dense mm of the same FLOPs. Writes ${OUT:-.}/gemm_variants.json.

A configuration may only be chosen per (K, N, dtype, GPU), never per row count: grouped_gemm.py's
batch-invariance argument rests on that.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def main() -> int:
    if not torch.cuda.is_available():
        print("gemm_variants.py needs a CUDA GPU (Triton grouped GEMMs)", file=sys.stderr)
        return 2
    from bench import back_to_back_ms, ev_time, layer_graph   # benchmarks/, beside this script
    from gemm_sweep import inputs
    from moe_ep.atomic import write_json_atomic
    from moe_ep.kernels.gemm_configs import DOWN_CONFIG, GATE_UP_CONFIG, GemmConfig, config_for
    from moe_ep.kernels.grouped_gemm import grouped_gemm

    dev = torch.device("cuda")
    SHAPES = [("anchor", 8192, 64, 8, 4096, 3072, True), ("hidream-4k", 4096, 4, 2, 2560, 6912, False),
              ("hidream-8k", 8192, 4, 2, 2560, 6912, False), ("hidream-16k", 16384, 4, 2, 2560, 6912, False)]
    only = sys.argv[1:] or [s[0] for s in SHAPES]
    GU = {"cur": GATE_UP_CONFIG,
          "s3": GemmConfig(128, 128, 64, 8, 8, 3, desc=True, gather_on_load=False),
          "g16": GemmConfig(128, 128, 64, 16, 8, 4, desc=True, gather_on_load=False),
          "g4": GemmConfig(128, 128, 64, 4, 8, 4, desc=True, gather_on_load=False),
          "bn64w4": GemmConfig(128, 64, 64, 8, 4, 4, desc=True, gather_on_load=False),
          "bn64w4s6": GemmConfig(128, 64, 64, 8, 4, 6, desc=True, gather_on_load=False),
          "ws": GemmConfig(128, 128, 64, 8, 8, 4, desc=True, gather_on_load=False, warp_specialize=True)}
    DN = {"cur": DOWN_CONFIG,
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
        d = inputs(T, E, k, H, F, renorm, dev)      # gemm_sweep.py's layer and GEMM inputs
        layer, x, counts, w13, w2, h, scale = (d[n] for n in ("layer", "x", "counts", "w13", "w2", "h", "scale"))
        xp = x[d["rows"]].contiguous()              # the rows in slot order, as the copy writes them
        M = T * k
        r = {"backend": layer.experts.backend}
        # the layer's configurations at this (K, N) ("cur"), and the defaults where they differ
        GU["cur"], DN["cur"] = config_for("gate_up", w13), config_for("down", w2)
        GU.pop("default", None)
        DN.pop("default", None)
        if GU["cur"] != GATE_UP_CONFIG:
            GU["default"] = GATE_UP_CONFIG
        if DN["cur"] != DOWN_CONFIG:
            DN["default"] = DOWN_CONFIG
        with torch.no_grad():
            f = lambda: layer(x)  # noqa: E731
            r["layer_eager"] = ev_time(f)
            r["layer_queued"] = back_to_back_ms(layer, x, 20)
            replay = layer_graph(layer, x)
            r["layer_graph"] = ev_time(lambda: replay(x))
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
            r["row_copy"] = ev_time(lambda: x[d["rows"]])
            r["tflop"] = (flops_gu + flops_dn) / 1e12
        results[name] = r
        print(name, json.dumps(r), flush=True)
    out = os.environ.get("OUT", ".")
    write_json_atomic(os.path.join(out, "gemm_variants.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
