"""Times the pieces of the EP = 1 layer, each variant against what it replaces, in one process:
grouped GEMMs (torch._grouped_mm vs moe_ep.kernels' Triton kernels, pointer loads vs TMA
descriptors, several tile shapes, gather on load), router logits, index math, combine.

    python launch/gpu_kernel_variants.py [--json out.json]     # one GPU (Hopper for TMA)

CUDA events, 3 warm-ups, median of 10 (GEMMs) or 20 (small kernels). Each GEMM variant's
output is compared with torch._grouped_mm's (rel. L2); two slots are checked against float64.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.dispatch import inverse_permutation  # noqa: E402
from moe_ep.experts import silu_gate  # noqa: E402
from moe_ep.kernels.combine import gather_sum  # noqa: E402
from moe_ep.kernels.grouped_gemm import GemmConfig, grouped_gemm  # noqa: E402
from moe_ep.local_path import counting_sort  # noqa: E402


def bench(fn, reps=10, warmup=3) -> float:
    if SMOKE:
        fn()
        return 1.0
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


SMOKE = False  # --smoke: tiny sizes on the CPU (Triton interpreter), checks the script runs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def gemm_references(xs, w13, w2, counts, scale, act):
    """torch._grouped_mm results to check the Triton variants against: (h [N, F], the same
    contiguous, y [N, H] = (h @ w2) * scale)."""
    offs = counts.cumsum(0).to(torch.int32)
    ref_h = act(torch._grouped_mm(xs, w13, offs=offs))
    hin = ref_h.contiguous()
    return ref_h, hin, torch._grouped_mm(hin, w2, offs=offs) * scale[:, None]


def bench_layer_configs(x, w2, k, combos: dict, out: dict) -> None:
    """The whole bf16 layer (random gate, same shapes) with each (gate/up, down) config pair of
    `combos` swapped into moe_ep.kernels, alternating, twice: out[name] = {"ms": median of 20}."""
    from moe_ep.config import MoEConfig
    from moe_ep.experts import init_expert_weights
    from moe_ep.kernels import grouped_gemm as gg
    from moe_ep.layer import MoELayer
    from moe_ep.parallel import ParallelContext
    T, H = x.shape
    Fh, S = w2.shape[1], w2.shape[0]
    layer = MoELayer(H, MoEConfig(num_experts=S, top_k=k, expert_hidden_size=Fh), ParallelContext(device=x.device),
                     dtype=torch.bfloat16)
    layer.router.gate.weight.data.normal_(std=0.02)
    layer.load_expert_weights(lambda e: init_expert_weights(0, 0, e, H, Fh, torch.bfloat16, x.device))
    up0, down0 = gg.GATE_UP_CONFIG, gg.DOWN_CONFIG
    try:
        for rep in ("", " again"):
            for name, (u, d) in combos.items():
                gg.GATE_UP_CONFIG, gg.DOWN_CONFIG = u, d
                out[name + rep] = {"ms": bench(lambda: layer(x), reps=20)}
    finally:
        gg.GATE_UP_CONFIG, gg.DOWN_CONFIG = up0, down0


def round3(x, xs, w13, w2, counts, order, scale, act, flops1, flops2, k) -> dict:
    """Warp-specialised K loops (tl.range(warp_specialize=True)) vs the defaults, alone and in
    the whole layer (the module's configs swapped in place, alternating, twice)."""
    import dataclasses

    from moe_ep.kernels import grouped_gemm as gg
    ri = order // k
    ref_h, hin, ref_y = gemm_references(xs, w13, w2, counts, scale, act)
    up0, down0 = gg.GATE_UP_CONFIG, gg.DOWN_CONFIG
    up1, down1 = dataclasses.replace(up0, warp_specialize=True), dataclasses.replace(down0, warp_specialize=True)
    out: dict = {}
    for name, fn, ref in [
            ("gate_up default", lambda: grouped_gemm(x, w13, counts, swiglu=True, row_index=ri, config=up0), ref_h),
            ("gate_up warp-specialised", lambda: grouped_gemm(x, w13, counts, swiglu=True, row_index=ri, config=up1),
             ref_h),
            ("down default", lambda: grouped_gemm(hin, w2, counts, row_scale=scale, config=down0), ref_y),
            ("down warp-specialised", lambda: grouped_gemm(hin, w2, counts, row_scale=scale, config=down1), ref_y)]:
        try:
            o = fn()
            out[name] = {"ms": bench(fn), "rel": rel(o, ref)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"ms": float("nan"), "rel": f"failed: {e!r}"[:300]}
    combos = {"layer default": (up0, down0)}
    if isinstance(out["gate_up warp-specialised"]["rel"], float):
        combos["layer ws gate_up"] = (up1, down0)
    if isinstance(out["down warp-specialised"]["rel"], float):
        combos["layer ws both"] = (up1, down1) if "layer ws gate_up" in combos else (up0, down1)
    bench_layer_configs(x, w2, k, combos, out)
    return {"round3": out}


def round4(x, xs, w13, w2, counts, order, scale, act, flops1, flops2, k) -> dict:
    """BM = 64 tiles (half the padding of a slot's last tile) against the defaults, alone and in
    the layer; and the shared expert (one dense SwiGLU over all tokens) as torch matmuls + an
    elementwise SwiGLU vs the grouped kernels with one slot (SwiGLU fused in the epilogue)."""
    import dataclasses

    from moe_ep.experts import swiglu
    from moe_ep.kernels import grouped_gemm as gg
    ri = order // k
    ref_h, hin, ref_y = gemm_references(xs, w13, w2, counts, scale, act)
    up0, down0 = gg.GATE_UP_CONFIG, gg.DOWN_CONFIG
    ups = {"gate_up default (128,128,64,8,8,4)": up0}
    for st in (4, 5):
        ups[f"gate_up BM64 (64,128,64,8,4,{st})"] = dataclasses.replace(up0, BM=64, num_warps=4, num_stages=st)
    downs = {"down default (128,256,64,8,8,3)": down0}
    for st in (3, 4):
        downs[f"down BM64 (64,256,64,8,4,{st})"] = dataclasses.replace(down0, BM=64, num_warps=4, num_stages=st)
        downs[f"down BM64 8 warps (64,256,64,8,8,{st})"] = dataclasses.replace(down0, BM=64, num_stages=st)
    out: dict = {}
    tiles = {}
    for bm in (64, 128):
        tiles[bm] = int(((counts + bm - 1) // bm).sum()) * bm
    out["padded rows (BM 64 / BM 128 / real)"] = {"ms": 0.0, "rel": f"{tiles[64]} / {tiles[128]} / {int(counts.sum())}"}
    for name, cfg in ups.items():
        fn = lambda cfg=cfg: grouped_gemm(x, w13, counts, swiglu=True, row_index=ri, config=cfg)  # noqa: E731
        try:
            out[name] = {"ms": bench(fn), "rel": rel(fn(), ref_h)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"ms": float("nan"), "rel": f"failed: {e!r}"[:300]}
    for name, cfg in downs.items():
        fn = lambda cfg=cfg: grouped_gemm(hin, w2, counts, row_scale=scale, config=cfg)  # noqa: E731
        try:
            out[name] = {"ms": bench(fn), "rel": rel(fn(), ref_y)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"ms": float("nan"), "rel": f"failed: {e!r}"[:300]}
    # the shared expert of hunyuan_like: [T, H] through one SwiGLU of width F
    T = x.shape[0]
    sw13, sw2 = w13[0].contiguous(), w2[0].contiguous()
    one = torch.full((1,), T, dtype=torch.int64, device=x.device)
    ref_s = swiglu(x.double(), sw13.double(), sw2.double())
    fused = lambda: grouped_gemm(grouped_gemm(x, sw13[None], one, swiglu=True, config=up0),  # noqa: E731
                                 sw2[None], one, config=down0)
    for name, fn in [("shared expert: torch matmuls + elementwise SwiGLU", lambda: swiglu(x, sw13, sw2)),
                     ("shared expert: grouped kernels, one slot, SwiGLU fused", fused)]:
        try:
            out[name] = {"ms": bench(fn), "rel": rel(fn(), ref_s)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"ms": float("nan"), "rel": f"failed: {e!r}"[:300]}
    combos = {"layer default": (up0, down0)}
    ran_up = [n for n in ups if isinstance(out[n]["rel"], float)]
    ran_down = [n for n in downs if isinstance(out[n]["rel"], float)]
    if ran_up and ran_down:
        best_up = min(ran_up, key=lambda n: out[n]["ms"])
        best_down = min(ran_down, key=lambda n: out[n]["ms"])
        combos[f"layer {best_up} + {best_down}"] = (ups[best_up], downs[best_down])
    bench_layer_configs(x, w2, k, combos, out)
    return {"round4": out}


def round2(x, xs, w13, w2, counts, order, slots, scale, wts, ids, gate, act, flops1, flops2, k, S) -> dict:
    """Second round (after the first sweep): TMA weights with A gathered on load vs copied first,
    more TMA tile shapes, the down GEMM with the row scale, the Triton counting sort, router steps."""
    from moe_ep.kernels.sort import counting_sort_cuda
    offs = counts.cumsum(0).to(torch.int32)
    ri = order // k
    ref_h = act(torch._grouped_mm(xs, w13, offs=offs))
    hin = ref_h.contiguous()
    ref_y = torch._grouped_mm(hin, w2, offs=offs) * scale[:, None]
    out: dict = {}
    runs = [("gate_up grouped_mm + compiled act (x pre-permuted)", lambda: act(torch._grouped_mm(xs, w13, offs=offs)),
             ref_h, flops1)]
    for cfg in [GemmConfig(128, 128, 64, 8, 8, 4, desc=True), GemmConfig(128, 128, 64, 8, 8, 4, desc=True,
                                                                           gather_on_load=False),
                GemmConfig(128, 128, 64, 8, 8, 3, desc=True), GemmConfig(128, 128, 64, 8, 8, 5, desc=True),
                GemmConfig(128, 128, 64, 4, 8, 4, desc=True), GemmConfig(128, 128, 64, 32, 8, 4, desc=True),
                GemmConfig(128, 128, 128, 8, 8, 2, desc=True), GemmConfig(128, 128, 64, 8, 8, 4)]:
        runs.append((f"gate_up gather {cfg}", lambda cfg=cfg: grouped_gemm(x, w13, counts, swiglu=True, row_index=ri,
                                                                           config=cfg), ref_h, flops1))
    runs.append(("down grouped_mm + scale", lambda: (torch._grouped_mm(hin, w2, offs=offs) * scale[:, None]).to(
        torch.bfloat16), ref_y, flops2))
    for cfg in [GemmConfig(128, 256, 64, 8, 8, 3, desc=True), GemmConfig(128, 256, 64, 8, 8, 4, desc=True),
                GemmConfig(128, 256, 64, 4, 8, 3, desc=True), GemmConfig(128, 256, 64, 16, 8, 3, desc=True),
                GemmConfig(128, 256, 64, 8, 8, 4)]:
        runs.append((f"down scale {cfg}", lambda cfg=cfg: grouped_gemm(hin, w2, counts, row_scale=scale, config=cfg),
                     ref_y, flops2))
    for name, fn, ref, fl in runs:
        try:
            o = fn()
            ms = bench(fn)
            out[name] = {"ms": ms, "tflops": fl / ms / 1e9, "rel": rel(o, ref)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"ms": float("nan"), "tflops": None, "rel": f"failed: {e!r}"[:300]}
    res = {"round2_gemm": out}
    N = slots.numel()
    w_flat = wts.reshape(-1).float()

    def argsort_path():
        o = torch.argsort(slots, stable=True)
        return inverse_permutation(o), o // k, w_flat[o]
    pa, ra, sa = argsort_path()
    pc, _, rc, sc = counting_sort_cuda(slots, S, top_k=k, weights=w_flat)
    res["index_ms"] = {"argsort + inverse + gathers": bench(argsort_path, 20),
                       "triton counting sort (+ row index, row scale)": bench(
                           lambda: counting_sort_cuda(slots, S, top_k=k, weights=w_flat), 20),
                       "same": bool(torch.equal(pa, pc) and torch.equal(ra, rc) and torch.equal(sa, sc))}
    scores = F.linear(x.float(), gate.float()).softmax(-1)
    res["router_ms"] = {
        "mm out_dtype": bench(lambda: F.linear(x.float(), gate.float()) if SMOKE else
                              torch.mm(x, gate.t(), out_dtype=torch.float32), 20),
        "softmax": bench(lambda: scores.softmax(-1), 20),
        "topk 8 of 64": bench(lambda: scores.topk(k, dim=-1), 20),
        "gather+renorm": bench(lambda: (lambda w: w / w.sum(-1, keepdim=True))(scores.gather(1, ids)), 20),
        "choices[ids, 0]": bench(lambda: torch.arange(S, device=x.device).view(S, 1)[ids.reshape(-1), 0], 20),
    }
    res["round2_small_ms"] = {"N": N}
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="fewer GEMM configs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    p.add_argument("--round4", action="store_true",
                   help="only the fourth round: BM 64 tiles, the shared expert through the grouped kernels")
    p.add_argument("--round3", action="store_true",
                   help="only the third round: warp-specialised TMA GEMMs, alone and in the layer")
    p.add_argument("--round2", action="store_true",
                   help="only the second round: TMA with gathered A, TMA tile shapes, Triton counting sort, router steps")
    args = p.parse_args()
    global SMOKE
    SMOKE = args.smoke
    dev = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    res: dict = {"device": "cpu" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__}
    D = 64 if SMOKE else 8192
    # ---- ceilings
    a = torch.randn(D, D, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    res["dense_bf16_tflops"] = 2 * D ** 3 / ms / 1e9
    big = torch.randn(D * D, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: big.clone())
    res["copy_tb_s"] = 2 * big.numel() * 2 / ms / 1e9
    del a, big

    # ---- the layer's shapes, routing from a random gate
    T, H, Fh, S, k = (64, 64, 32, 8, 2) if SMOKE else (8192, 4096, 3072, 64, 8)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    gate = (torch.randn(S, H, device=dev) * 0.02).to(torch.bfloat16)
    logits = F.linear(x.float(), gate.float())
    wts, ids = logits.softmax(-1).topk(k, dim=-1)
    wts = wts / wts.sum(-1, keepdim=True)
    slots = ids.reshape(-1)
    N = slots.numel()
    order = torch.argsort(slots, stable=True)
    counts = torch.bincount(slots, minlength=S)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[order // k]                                                          # [N, H] permuted copy
    w13 = torch.randn(S, H, 2 * Fh, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(S, Fh, H, device=dev, dtype=torch.bfloat16) * Fh ** -0.5
    scale = wts.reshape(-1)[order].float().contiguous()                         # [N]
    act = silu_gate if SMOKE else torch.compile(silu_gate, dynamic=True)
    flops1, flops2 = 2 * N * H * 2 * Fh, 2 * N * Fh * H

    # ---- router logits
    r = {}
    ref_logits = F.linear(x.float(), gate.float())
    r["F.linear(x.float(), w.float())"] = bench(lambda: F.linear(x.float(), gate.float()), 20)
    try:
        if SMOKE:
            raise RuntimeError("no mm.dtype on CPU")
        out = torch.mm(x, gate.t(), out_dtype=torch.float32)
        r["torch.mm(x, w.t(), out_dtype=fp32)"] = bench(lambda: torch.mm(x, gate.t(), out_dtype=torch.float32), 20)
        r["mm out_dtype rel err"] = rel(out, ref_logits)
        r["mm out_dtype same top-8"] = float((out.topk(k).indices == ref_logits.topk(k).indices).float().mean())
    except Exception as e:  # noqa: BLE001
        r["torch.mm out_dtype"] = f"failed: {e!r}"[:200]
    res["router_ms"] = r

    # ---- index math: argsort + inverse permutation vs counting sort
    def argsort_path():
        o = torch.argsort(slots, stable=True)
        return inverse_permutation(o), o // k
    def counting_path():
        pos, c = counting_sort(slots, S)
        ri = torch.empty_like(pos)
        ri[pos] = torch.arange(N, device=dev) // k
        return pos, ri
    pa, _ = argsort_path()
    pc, _ = counting_path()
    res["index_ms"] = {"argsort+inverse": bench(argsort_path, 20), "counting sort": bench(counting_path, 20),
                       "same positions": bool(torch.equal(pa, pc))}

    for name, run_round in (("round4", round4), ("round3", round3)):
        if getattr(args, name):
            res.update(run_round(x, xs, w13, w2, counts, order, scale, act, flops1, flops2, k))
            print(json.dumps(res, indent=1, default=str))
            if args.json:
                write_json_atomic(args.json, json.loads(json.dumps(res, default=str)))
            for n, v in res[name].items():
                rr = v.get("rel", "")
                print(f"{n[:120]:120s} {v['ms']:7.3f} ms rel {rr if isinstance(rr, str) else f'{rr:.1e}'}")
            return
    if args.round2:
        res.update(round2(x, xs, w13, w2, counts, order, slots, scale, wts, ids, gate, act, flops1, flops2, k, S))
        print(json.dumps(res, indent=1, default=str))
        if args.json:
            write_json_atomic(args.json, json.loads(json.dumps(res, default=str)))
        for n, v in res["round2_gemm"].items():
            rr = v["rel"]
            print(f"{n[:120]:120s} {v['ms']:7.3f} ms {v['tflops'] or 0:5.0f} TF rel {rr if isinstance(rr, str) else f'{rr:.1e}'}")
        for sec in ("router_ms", "index_ms", "round2_small_ms"):
            print(sec, json.dumps(res[sec], default=str))
        return

    # ---- gate/up GEMM (+ activation)
    ref_h = act(torch._grouped_mm(xs, w13, offs=offs))
    g = {}
    g["torch._grouped_mm + compiled silu-gate"] = (bench(lambda: act(torch._grouped_mm(xs, w13, offs=offs))), 0.0)
    g["torch._grouped_mm alone"] = (bench(lambda: torch._grouped_mm(xs, w13, offs=offs)), 0.0)
    g["x[perm] gather alone"] = (bench(lambda: x[order // k]), 0.0)
    cfgs1 = [GemmConfig(128, 128, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 4), GemmConfig(64, 128, 64, 8, 4, 4),
             GemmConfig(128, 64, 64, 8, 4, 4), GemmConfig(128, 128, 64, 16, 8, 3)]
    if args.quick:
        cfgs1 = cfgs1[:2]
    for cfg in cfgs1:
        name = f"triton swiglu {cfg}"
        try:
            h = grouped_gemm(xs, w13, counts, swiglu=True, config=cfg)
            g[name] = (bench(lambda: grouped_gemm(xs, w13, counts, swiglu=True, config=cfg)), rel(h, ref_h))
        except Exception as e:  # noqa: BLE001
            g[name] = (float("nan"), f"failed: {e!r}"[:300])
    for cfg in cfgs1[:2]:
        name = f"triton swiglu gather-on-load {cfg}"
        try:
            ri = order // k
            h = grouped_gemm(x, w13, counts, swiglu=True, row_index=ri, config=cfg)
            g[name] = (bench(lambda: grouped_gemm(x, w13, counts, swiglu=True, row_index=ri, config=cfg)),
                       rel(h, ref_h))
        except Exception as e:  # noqa: BLE001
            g[name] = (float("nan"), f"failed: {e!r}"[:300])
    res["gate_up"] = {n: {"ms": v[0], "tflops": None if "gather alone" in n or v[0] != v[0] else flops1 / v[0] / 1e9,
                          "rel_vs_grouped_mm": v[1]} for n, v in g.items()}
    # float64 check of two slots of the best-guess config
    h = grouped_gemm(xs, w13, counts, swiglu=True, config=cfgs1[0])
    start = torch.cat([torch.zeros(1, device=dev, dtype=torch.int64), counts.cumsum(0)])
    f64 = []
    for s in (0, S - 1):
        lo, hi = int(start[s]), int(start[s + 1])
        gu = xs[lo:hi].double() @ w13[s].double()
        ref = F.silu(gu[:, :Fh]) * gu[:, Fh:]
        f64.append({"slot": s, "triton_rel": rel(h[lo:hi].double(), ref), "grouped_mm_rel": rel(ref_h[lo:hi].double(), ref)})
    res["gate_up_fp64"] = f64

    # ---- down GEMM (+ row scale)
    hin = ref_h.contiguous()
    ref_y = torch._grouped_mm(hin, w2, offs=offs)
    d = {"torch._grouped_mm": (bench(lambda: torch._grouped_mm(hin, w2, offs=offs)), 0.0),
         "torch._grouped_mm then * scale": (bench(lambda: (torch._grouped_mm(hin, w2, offs=offs) * scale[:, None]).to(
             torch.bfloat16)), 0.0)}
    cfgs2 = [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 256, 64, 8, 8, 4), GemmConfig(128, 128, 64, 8, 8, 4),
             GemmConfig(128, 128, 64, 8, 4, 4), GemmConfig(128, 128, 128, 8, 8, 3)]
    if args.quick:
        cfgs2 = cfgs2[:2]
    for cfg in cfgs2:
        name = f"triton down {cfg}"
        try:
            y = grouped_gemm(hin, w2, counts, config=cfg)
            d[name] = (bench(lambda: grouped_gemm(hin, w2, counts, config=cfg)), rel(y, ref_y))
        except Exception as e:  # noqa: BLE001
            d[name] = (float("nan"), f"failed: {e!r}"[:300])
    for cfg in cfgs2[:1]:
        name = f"triton down + row scale {cfg}"
        y = grouped_gemm(hin, w2, counts, row_scale=scale, config=cfg)
        d[name] = (bench(lambda: grouped_gemm(hin, w2, counts, row_scale=scale, config=cfg)),
                   rel(y, ref_y * scale[:, None]))
    res["down"] = {n: {"ms": v[0], "tflops": flops2 / v[0] / 1e9 if v[0] == v[0] else None,
                       "rel_vs_grouped_mm": v[1]} for n, v in d.items()}

    # ---- combine
    y = ref_y
    inv = inverse_permutation(order)
    w_bf = wts.to(torch.bfloat16)
    ref_c = torch.bmm(w_bf.unsqueeze(1), y[inv].view(T, k, H)).view(T, H)
    ys = (y.float() * scale[:, None]).to(torch.bfloat16)
    res["combine_ms"] = {
        "gather [T*k,H] + bmm (before)": bench(lambda: torch.bmm(w_bf.unsqueeze(1), y[inv].view(T, k, H)), 20),
        "triton gather-sum, weights in kernel": bench(lambda: gather_sum(y, inv, T, top_k=k,
                                                                         weights=wts.reshape(-1)), 20),
        "triton gather-sum, rows pre-scaled": bench(lambda: gather_sum(ys, inv, T, top_k=k), 20),
        "rel (weights in kernel vs before)": rel(gather_sum(y, inv, T, top_k=k, weights=wts.reshape(-1)), ref_c),
        "rel (pre-scaled vs before)": rel(gather_sum(ys, inv, T, top_k=k), ref_c),
    }
    for bh in (512, 2048, 4096):
        res["combine_ms"][f"triton gather-sum pre-scaled block_h={bh}"] = bench(
            lambda: gather_sum(ys, inv, T, top_k=k, block_h=bh), 20)

    # ---- TMA descriptors last: a kernel fault here cannot spoil the numbers above
    tma = {}
    for cfg in [GemmConfig(128, 128, 64, 8, 8, 3, desc=True), GemmConfig(128, 128, 64, 8, 8, 4, desc=True)]:
        name = f"gate_up {cfg}"
        try:
            h = grouped_gemm(xs, w13, counts, swiglu=True, config=cfg)
            ms = bench(lambda: grouped_gemm(xs, w13, counts, swiglu=True, config=cfg))
            tma[name] = {"ms": ms, "tflops": flops1 / ms / 1e9, "rel_vs_grouped_mm": rel(h, ref_h)}
        except Exception as e:  # noqa: BLE001
            tma[name] = {"ms": float("nan"), "tflops": None, "rel_vs_grouped_mm": f"failed: {e!r}"[:300]}
    for cfg in [GemmConfig(128, 256, 64, 8, 8, 3, desc=True), GemmConfig(128, 128, 64, 8, 8, 4, desc=True)]:
        name = f"down {cfg}"
        try:
            y = grouped_gemm(hin, w2, counts, config=cfg)
            ms = bench(lambda: grouped_gemm(hin, w2, counts, config=cfg))
            tma[name] = {"ms": ms, "tflops": flops2 / ms / 1e9, "rel_vs_grouped_mm": rel(y, ref_y)}
        except Exception as e:  # noqa: BLE001
            tma[name] = {"ms": float("nan"), "tflops": None, "rel_vs_grouped_mm": f"failed: {e!r}"[:300]}
    res["tma"] = tma

    print(json.dumps(res, indent=1, default=str))
    if args.json:
        write_json_atomic(args.json, json.loads(json.dumps(res, default=str)))
    print(f"\nceilings: dense bf16 {res['dense_bf16_tflops']:.0f} TFLOP/s, copy {res['copy_tb_s']:.2f} TB/s")
    for sec in ("gate_up", "down", "tma"):
        for n, v in res[sec].items():
            t = f"{v['tflops']:.0f}" if isinstance(v["tflops"], float) else "-"
            rr = v["rel_vs_grouped_mm"]
            print(f"{sec:8s} {n[:110]:110s} {v['ms']:7.3f} ms {t:>5s} TF rel {rr if isinstance(rr, str) else f'{rr:.1e}'}")
    for sec in ("router_ms", "index_ms", "combine_ms"):
        print(sec, json.dumps(res[sec], default=str))


if __name__ == "__main__":
    main()
