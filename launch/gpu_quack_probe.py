"""Does QuACK's CuTe-DSL grouped GEMM do more work per second than moe-ep's Triton kernels on the
layer's two expert GEMMs (8192 tokens, 64 experts, top-8, H 4096, F 3072, bf16, random routing)?

QuACK (`pip install quack-kernels`, Dao AI Lab) builds Hopper GEMMs the way cuBLAS does: ping-pong
consumer warpgroups, a persistent tile scheduler, 2-CTA clusters with TMA multicast of the shared
operand. Its varlen-M GEMM takes the layer's slot-grouped rows (cu_seqlens_m), gathers A rows
on load (A_idx) and fuses a gated SwiGLU epilogue, so it can replace both Triton kernels.

    python launch/gpu_quack_probe.py [--json out.json]     # one Hopper GPU, quack-kernels installed
    python launch/gpu_quack_probe.py --in-place            # layer + compiled model: Triton vs QuACK down GEMM
    python launch/gpu_quack_probe.py --gate-up-in-place    # the same for gate/up (on interleaved weight copies)

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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_power_probe import gemm_flops, routed_rows  # noqa: E402
from gpu_profile import sustained_vs_burst  # noqa: E402
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.kernels import grouped_gemm as gg  # noqa: E402


def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """[S, H, 2F] with [gate | up] columns -> [S, H, 2F] with columns g0, u0, g1, u1, ...
    (QuACK's gated epilogue pairs neighbouring columns)."""
    S, H, F2 = w13.shape
    return w13.view(S, H, 2, F2 // 2).transpose(2, 3).reshape(S, H, F2).contiguous()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def set_quack_down(module: torch.nn.Module, on: bool) -> None:
    """Every routed-expert block and shared expert in `module`: down GEMM through QuACK (on) or Triton."""
    from moe_ep.experts import DenseMLP, GroupedExperts
    for m in module.modules():
        if isinstance(m, GroupedExperts) and m.backend in ("triton", "triton+quack"):
            m.backend = "triton+quack" if on else "triton"
        elif isinstance(m, DenseMLP):
            m.quack_down = on


def in_place_ab() -> dict:
    """The layer (random gate) and the compiled hunyuan_like forward, down GEMM through Triton vs
    QuACK, taking turns (launch/gpu_power_probe.interleaved)."""
    from gpu_check import make_layer
    from gpu_power_probe import interleaved
    from gpu_profile import hunyuan_case
    res = {}
    dev = torch.device("cuda")
    layer, x = make_layer(dev)
    fns = {}
    for name, on in (("triton down", False), ("quack down", True)):
        fns[name] = (lambda on=on: (set_quack_down(layer, on), layer(x))[1])
    same = bool(torch.equal(fns["triton down"](), fns["quack down"]()))
    res["layer"] = interleaved(fns, rounds=10, iters=20)
    res["layer"]["outputs_equal"] = same
    print("layer", {k: v["median_ms"] for k, v in res["layer"].items() if isinstance(v, dict)}, "equal", same, flush=True)
    del layer, x, fns
    torch.cuda.empty_cache()
    model, fwd = hunyuan_case()
    model.compile()
    fns = {name: (lambda on=on: (set_quack_down(model, on), fwd())[1])
           for name, on in (("triton down", False), ("quack down", True))}
    same = bool(torch.equal(fns["triton down"](), fns["quack down"]()))
    res["hunyuan forward compiled"] = interleaved(fns, rounds=8, iters=5)
    res["hunyuan forward compiled"]["outputs_equal"] = same
    print("hunyuan forward compiled", {k: v["median_ms"] for k, v in res["hunyuan forward compiled"].items()
                                       if isinstance(v, dict)}, "equal", same, flush=True)
    return res


def quack_gate_up_swiglu():
    """A stand-in for moe_ep.experts.triton_swiglu with gate/up through QuACK too: its gated GEMM
    on an interleaved copy of w13 (made once per weight tensor), then the QuACK down GEMM. It
    measures what storing w13 interleaved would buy; moe-ep does not store it so."""
    from quack.gemm_config import GemmConfig as QConfig
    from quack.gemm_interface import gemm_act

    from moe_ep.kernels.quack_down import down_gemm
    cfg = QConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1, is_dynamic_persistent=False)
    copies = {}

    def swiglu(x, w13, w2, counts, row_scale=None, row_index=None, quack_down=True):
        wi = copies.get(w13.data_ptr())
        if wi is None:
            wi = copies[w13.data_ptr()] = interleave_gate_up(w13)
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)                 # [S + 1]
        a = x[row_index] if row_index is not None else x                     # rows copied first (faster)
        _, h = gemm_act(a, wi, activation="swiglu", cu_seqlens_m=cu, store_preact=False, tuned=False, config=cfg)
        return down_gemm(h, w2, counts, row_scale)
    return swiglu


def gate_up_ab() -> dict:
    """The layer and the compiled hunyuan_like forward (QuACK down GEMM in both), gate/up through
    Triton vs through QuACK on interleaved weight copies, taking turns."""
    from gpu_check import make_layer
    from gpu_power_probe import interleaved
    from gpu_profile import hunyuan_case

    import moe_ep.experts as experts
    triton_path, quack_path = experts.triton_swiglu, quack_gate_up_swiglu()
    res = {}
    try:
        def turns(fwd):
            fns = {}
            for name, impl in (("triton gate/up", triton_path), ("quack gate/up", quack_path)):
                def fn(impl=impl):
                    experts.triton_swiglu = impl
                    return fwd()
                fns[name] = fn
            return fns, bool(torch.equal(fns["triton gate/up"](), fns["quack gate/up"]()))
        layer, x = make_layer(torch.device("cuda"))
        fns, same = turns(lambda: layer(x))
        res["layer"] = {**interleaved(fns, rounds=10, iters=20), "outputs_equal": same}
        print("layer", {k: v["median_ms"] for k, v in res["layer"].items() if isinstance(v, dict)}, "equal", same, flush=True)
        del layer, x, fns
        torch.cuda.empty_cache()
        model, fwd = hunyuan_case()
        model.compile()
        fns, same = turns(fwd)
        res["hunyuan forward compiled"] = {**interleaved(fns, rounds=8, iters=5), "outputs_equal": same}
        print("hunyuan forward compiled", {k: v["median_ms"] for k, v in res["hunyuan forward compiled"].items()
                                           if isinstance(v, dict)}, "equal", same, flush=True)
    finally:
        experts.triton_swiglu = triton_path
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--in-place", action="store_true",
                    help="only the layer and the compiled hunyuan_like forward, Triton vs QuACK down GEMM")
    ap.add_argument("--gate-up-in-place", action="store_true",
                    help="only the layer and the compiled forward, gate/up through Triton vs QuACK (interleaved copies)")
    args = ap.parse_args()
    if args.in_place or args.gate_up_in_place:
        from moe_ep.kernels.quack_down import _allow_unkeyed_dsl_globals
        _allow_unkeyed_dsl_globals()
        res = in_place_ab() if args.in_place else gate_up_ab()
        if args.json:
            write_json_atomic(args.json, res)
        return
    from moe_ep.kernels.quack_down import _allow_unkeyed_dsl_globals
    _allow_unkeyed_dsl_globals()                       # before quack builds its epilogues at import
    from quack.epilogue.library import norm_act_mod
    from quack.gemm_config import GemmConfig as QConfig
    from quack.gemm_interface import gemm, gemm_act

    dev = torch.device("cuda")
    r = routed_rows(dev)
    fg, fd = gemm_flops(r)
    counts = r["counts"]
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)                     # [S + 1]
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

    # the two best of each side taking turns, so clock drift falls on both
    ok = {n: v for n, v in out["variants"].items() if "sustained_ms" in v}
    best_q_gate = min((n for n in ok if n.startswith("quack gate")), key=lambda n: ok[n]["sustained_ms"], default=None)
    print("best quack gate/up:", best_q_gate, flush=True)


if __name__ == "__main__":
    main()
