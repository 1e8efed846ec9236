"""Does QuACK's CuTe-DSL grouped GEMM do more work per second than moe-ep's Triton kernels on the
layer's two expert GEMMs (8192 tokens, 64 experts, top-8, H 4096, F 3072, bf16, random routing)?

QuACK (`pip install quack-kernels`, Dao AI Lab) builds Hopper GEMMs the way cuBLAS does: ping-pong
consumer warpgroups, a persistent tile scheduler, 2-CTA clusters with TMA multicast of the shared
operand. Its varlen-M GEMM takes the layer's slot-grouped rows (cu_seqlens_m), gathers A rows
on load (A_idx) and fuses a gated SwiGLU epilogue, so it can replace both Triton kernels.

    python launch/gpu_quack_probe.py [--json out.json]     # one Hopper GPU, quack-kernels installed
    python launch/gpu_quack_probe.py --in-place            # layer + compiled model: Triton vs QuACK down GEMM
    python launch/gpu_quack_probe.py --gate-up-in-place    # the same: backend "triton+quack" vs "quack" (both GEMMs)

Each variant is timed as launch/gpu_power_probe.py times them: in a burst (50 ms idle before
each call) and sustained (back to back for 2 s), TFLOP/s of the 65536 real rows. Outputs are
compared with the Triton kernels' (max |difference| over max |value|): both round to bf16 once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_power_probe import gemm_flops, routed_rows  # noqa: E402
from gpu_profile import sustained_vs_burst  # noqa: E402
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.kernels import grouped_gemm as gg  # noqa: E402
from moe_ep.experts import interleave_gate_up  # noqa: E402
from moe_ep.kernels.quack_gemm import cu_seqlens  # noqa: E402


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def take_turns(variants: dict) -> dict:
    """variants: name -> switch(module), which sets the module to that variant. The layer (random
    gate) and then the compiled hunyuan_like forward run under each variant, taking turns
    (launch/gpu_power_probe.interleaved; a switch runs before its turn, untimed: a backend switch
    may re-lay the weights out); outputs are compared with torch.equal."""
    from gpu_check import make_layer
    from gpu_power_probe import interleaved
    from gpu_profile import hunyuan_case
    res = {}

    def run(case, module, fwd, rounds, iters):
        outs = []
        for switch in variants.values():
            switch(module)
            outs.append(fwd())
        same = all(torch.equal(outs[0], o) for o in outs[1:])
        before = {name: (lambda switch=switch: switch(module)) for name, switch in variants.items()}
        res[case] = {**interleaved({name: fwd for name in variants}, rounds=rounds, iters=iters, before=before),
                     "outputs_equal": same}
        print(case, {k: v["median_ms"] for k, v in res[case].items() if isinstance(v, dict)}, "equal", same, flush=True)
    layer, x = make_layer(torch.device("cuda"))
    run("layer", layer, lambda: layer(x), rounds=10, iters=20)
    del layer, x
    torch.cuda.empty_cache()
    model, fwd = hunyuan_case()
    model.compile()
    run("hunyuan forward compiled", model, fwd, rounds=8, iters=5)
    return res


def set_backend(module: torch.nn.Module, backend: str) -> None:
    """Every routed-expert block in `module` on `backend` ("quack", "triton+quack" or "triton"),
    and every shared expert's down GEMM through QuACK where the backend's is."""
    from moe_ep.experts import DenseMLP, GroupedExperts
    for m in module.modules():
        if isinstance(m, GroupedExperts):
            m.backend = backend
        elif isinstance(m, DenseMLP):
            m.quack_down = "quack" in backend


def new_shapes() -> dict:
    """At EP > 1 the rows an expert block gets change every forward. QuACK caches each call by
    its exact shapes: how long does the first call with a new row count take, against a repeat?
    And is each output bit-identical to the Triton down kernel's?"""
    from moe_ep.kernels.quack_gemm import down_gemm
    dev = torch.device("cuda")
    S, Fh, H = 32, 3072, 4096
    w2 = torch.randn(S, Fh, H, device=dev, dtype=torch.bfloat16) * Fh ** -0.5
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for M in (30000, 30017, 29950, 31234, 28801, 30500, 29999, 30001, 32768, 27000, 30333, 29000):
        counts = torch.bincount(torch.randint(0, S, (M,), generator=g), minlength=S).to(dev)
        h = torch.randn(M, Fh, device=dev, dtype=torch.bfloat16)
        scale = torch.rand(M, device=dev)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = down_gemm(h, w2, cu_seqlens(counts), scale)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        y_ref = gg.grouped_gemm(h, w2, counts, row_scale=scale, config=gg.DOWN_CONFIG)
        rows.append({"rows": M, "first_ms": times[0], "repeat_ms": min(times[1:]),
                     "equal": bool(torch.equal(y, y_ref))})
        print(rows[-1], flush=True)
    return {"calls": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    mode = ap.add_mutually_exclusive_group()      # one mode a run; none: every GEMM variant alone
    mode.add_argument("--in-place", action="store_true",
                      help="the layer and the compiled hunyuan_like forward, Triton vs QuACK down GEMM")
    mode.add_argument("--gate-up-in-place", action="store_true",
                      help="the same, backend triton+quack (QuACK down) vs quack (both GEMMs)")
    mode.add_argument("--new-shapes", action="store_true",
                      help="the QuACK down GEMM on a new row count each call (as at EP > 1)")
    args = ap.parse_args()
    from moe_ep.kernels.quack_gemm import _allow_unkeyed_dsl_globals
    _allow_unkeyed_dsl_globals()                       # before quack builds its epilogues at import
    if args.in_place or args.gate_up_in_place or args.new_shapes:
        if args.in_place:
            res = take_turns({"triton down": lambda m: set_backend(m, "triton"),
                              "quack down": lambda m: set_backend(m, "triton+quack")})
        elif args.gate_up_in_place:
            res = take_turns({"quack down": lambda m: set_backend(m, "triton+quack"),
                              "quack both": lambda m: set_backend(m, "quack")})
        else:
            res = new_shapes()
        if args.json:
            write_json_atomic(args.json, res)
        return
    from quack.epilogue.library import norm_act_mod
    from quack.gemm_config import GemmConfig as QConfig
    from quack.gemm_interface import gemm, gemm_act

    dev = torch.device("cuda")
    r = routed_rows(dev)
    fg, fd = gemm_flops(r)
    counts = r["counts"]
    cu = cu_seqlens(counts)                                                  # [S + 1]
    ri32 = r["ri"].to(torch.int32)
    w13i = interleave_gate_up(r["w13"])
    h_ref = gg.grouped_gemm(r["x"], r["w13"], counts, swiglu=True, row_index=r["ri"], config=gg.GATE_UP_CONFIG)
    y_ref = gg.grouped_gemm(h_ref, r["w2"], counts, row_scale=r["scale"], config=gg.DOWN_CONFIG)
    torch.cuda.synchronize()
    out = {"device": torch.cuda.get_device_name(), "variants": {}}

    def record(name, fn, flops, ref, result_of):
        t0 = time.time()
        try:
            res = fn()
            torch.cuda.synchronize()
            first_s = time.time() - t0
            d = rel_diff(result_of(res), ref)
            timing = sustained_vs_burst(fn, flops)
            row = {"first_call_s": round(first_s, 1), "rel_diff_vs_triton": d, **timing}
            print(f"{name:58s} burst {timing['burst_ms']:.3f} ms {timing['burst_tflops']:.0f} TF/s | "
                  f"sustained {timing['sustained_ms']:.3f} ms {timing['sustained_tflops']:.0f} TF/s "
                  f"{timing['sustained_sm_mhz']} MHz | diff {d:.2e} | first {first_s:.1f} s", flush=True)
        except Exception as e:  # a variant that does not build is recorded, the others still run
            row = {"error": f"{type(e).__name__}: {e}"[:600]}
            print(f"{name:58s} FAILED {row['error']}", flush=True)
            traceback.print_exc(limit=3)
        out["variants"][name] = row
        if args.json:                                  # after each variant: a killed run keeps what it had
            write_json_atomic(args.json, out)
        return row

    ident = lambda t: t  # noqa: E731
    record("triton gate/up (copy + TMA), the default",
           lambda: gg.grouped_gemm(r["x"], r["w13"], counts, swiglu=True, row_index=r["ri"], config=gg.GATE_UP_CONFIG),
           fg, h_ref, ident)
    gate_cfgs = {
        "128x192 pingpong cluster 2x1": QConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1,
                                                is_dynamic_persistent=False),
        "128x128 pingpong cluster 2x1": QConfig(tile_m=128, tile_n=128, pingpong=True, cluster_m=2, cluster_n=1,
                                                is_dynamic_persistent=False),
        "256x128 cooperative cluster 2x1": QConfig(tile_m=256, tile_n=128, pingpong=False, cluster_m=2, cluster_n=1,
                                                   is_dynamic_persistent=False),
        "256x192 cooperative cluster 2x1": QConfig(tile_m=256, tile_n=192, pingpong=False, cluster_m=2, cluster_n=1,
                                                   is_dynamic_persistent=False),
    }
    for label, cfg in gate_cfgs.items():
        record(f"quack gate/up gathered (A_idx), {label}",
               lambda cfg=cfg: gemm_act(r["x"], w13i, activation="swiglu", cu_seqlens_m=cu, A_idx=ri32,
                                        store_preact=False, tuned=False, config=cfg),
               fg, h_ref, lambda res: res[1])
    for label in ("128x192 pingpong cluster 2x1", "256x128 cooperative cluster 2x1"):
        cfg = gate_cfgs[label]
        record(f"quack gate/up on x[ri] (copy included), {label}",
               lambda cfg=cfg: gemm_act(r["x"][r["ri"]], w13i, activation="swiglu", cu_seqlens_m=cu,
                                        store_preact=False, tuned=False, config=cfg),
               fg, h_ref, lambda res: res[1])

    record("triton down + routed weight, the default",
           lambda: gg.grouped_gemm(h_ref, r["w2"], counts, row_scale=r["scale"], config=gg.DOWN_CONFIG),
           fd, y_ref, ident)
    y_unscaled = y_ref / r["scale"][:, None].to(y_ref.dtype)                  # for the variant without the scale
    scale_mod = norm_act_mod(None, gated=False, has_c=False, has_rowvec=False, has_colvec=True)
    down_cfgs = {
        "128x192 pingpong cluster 2x1": gate_cfgs["128x192 pingpong cluster 2x1"],
        "128x256 pingpong cluster 2x1": QConfig(tile_m=128, tile_n=256, pingpong=True, cluster_m=2, cluster_n=1,
                                                is_dynamic_persistent=False),
        "256x128 cooperative cluster 2x1": gate_cfgs["256x128 cooperative cluster 2x1"],
        "128x192 pingpong cluster 1x2": QConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=1, cluster_n=2,
                                                is_dynamic_persistent=False),
    }
    for label, cfg in down_cfgs.items():
        record(f"quack down, routed weight in the epilogue, {label}",
               lambda cfg=cfg: scale_mod(h_ref, r["w2"], None, store_d=False, tuned=False, config=cfg,
                                         cu_seqlens_m=cu, mColVecBroadcast=r["scale"]),
               fd, y_ref, lambda res: res["mAuxOut"])
    record("quack down, no weight (weighted combine instead), 128x192 pingpong 2x1",
           lambda: gemm(h_ref, r["w2"], cu_seqlens_m=cu, tuned=False),
           fd, y_unscaled, ident)
    record("quack gate/up gathered, autotuned (tuned=True)",
           lambda: gemm_act(r["x"], w13i, activation="swiglu", cu_seqlens_m=cu, A_idx=ri32,
                            store_preact=False, tuned=True),
           fg, h_ref, lambda res: res[1])

    ok = {n: v for n, v in out["variants"].items() if "sustained_ms" in v}
    best_q_gate = min((n for n in ok if n.startswith("quack gate")), key=lambda n: ok[n]["sustained_ms"], default=None)
    print("fastest QuACK gate/up, sustained:", best_q_gate, flush=True)


if __name__ == "__main__":
    main()
