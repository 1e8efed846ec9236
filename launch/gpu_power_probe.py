"""Which grouped-GEMM layouts do the most real work per second once the GPU sits at its power
limit? Each variant is timed in a burst (50 ms idle before each call, full SM clock) and
sustained (back to back for 2 s, power-limited clock), and its speed is given in TFLOP/s of the
*real* rows (65536 = 8192 tokens x top-8), so padding counts as overhead.

    python launch/gpu_power_probe.py [--json out.json]        # one Hopper GPU
    python launch/gpu_power_probe.py --persistent [--json out.json]   # persistent GEMMs vs the defaults
    python launch/gpu_power_probe.py --projections [--json out.json]  # attention projections, q + kv vs fused qkv

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
import statistics
import sys

from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import back_to_back_ms  # noqa: E402
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


def routed_rows(dev: torch.device) -> dict:
    """The layer's GEMM inputs with random routing (seed 0): x [8192, 4096], ri [65536] (token of each
    slot-grouped row), counts [64], xs = x[ri], w13 [64, 4096, 6144], w2 [64, 3072, 4096], scale [65536]."""
    torch.manual_seed(0)
    T, H, Fh, S, k = 8192, 4096, 3072, 64, 8
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    slots = torch.randint(0, S, (T * k,), device=dev)
    ri = torch.argsort(slots, stable=True) // k
    return {"x": x, "ri": ri, "counts": torch.bincount(slots, minlength=S), "xs": x[ri],
            "w13": torch.randn(S, H, 2 * Fh, device=dev, dtype=torch.bfloat16) * H ** -0.5,
            "w2": torch.randn(S, Fh, H, device=dev, dtype=torch.bfloat16) * Fh ** -0.5,
            "scale": torch.rand(T * k, device=dev)}


def gemm_flops(r: dict) -> tuple[int, int]:
    """(gate/up, down) FLOPs of the real rows of routed_rows(...)."""
    M, H = r["xs"].shape
    Fh = r["w2"].shape[1]
    return 2 * M * H * 2 * Fh, 2 * M * Fh * H


def interleaved(fns: dict, rounds: int, iters: int, before: Optional[dict] = None) -> dict:
    """The fns take turns, `rounds` times; each turn runs one fn `iters` times back to back
    (CUDA events around the turn), after `before[name]()` (untimed) where given. name ->
    {"median_ms": median over turns of ms per call, "turns_ms": every turn}. Taking turns
    spreads the GPU's clock drift over all of them."""
    before = before or {}
    out = {name: [] for name in fns}
    for name, fn in fns.items():
        before.get(name, lambda: None)()
        fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            torch.cuda.synchronize()
            out[name].append(back_to_back_ms(lambda _, fn=fn: fn(), None, iters))
    return {name: {"median_ms": statistics.median(v), "turns_ms": [round(t, 3) for t in v]} for name, v in out.items()}


def persistent_ab() -> dict:
    """The persistent TMA GEMMs (GemmConfig.persistent) against the defaults: each GEMM alone in
    a burst and sustained, then the whole layer and the compiled hunyuan_like forward taking turns
    with the module's configs swapped."""
    import dataclasses

    from gpu_check import make_layer
    from gpu_profile import hunyuan_case
    up0, down0 = gg.GATE_UP_CONFIG, gg.DOWN_CONFIG
    ups = {"gate/up default": up0}
    downs = {"down default": down0}
    for st in (3, 4):
        ups[f"gate/up persistent, stages {st}"] = dataclasses.replace(up0, persistent=True, num_stages=st)
        downs[f"down persistent, stages {st}"] = dataclasses.replace(down0, persistent=True, num_stages=st)
    dev = torch.device("cuda")
    rows = routed_rows(dev)
    xs, counts, w13, w2, scale = (rows[n] for n in ("xs", "counts", "w13", "w2", "scale"))
    f1, f2 = gemm_flops(rows)
    del rows
    res: dict = {"alone": {}}
    h0 = gg.grouped_gemm(xs, w13, counts, swiglu=True, config=up0)
    y0 = gg.grouped_gemm(h0, w2, counts, row_scale=scale, config=down0)
    def alone(name, fn, flops, ref):
        try:
            r = sustained_vs_burst(fn, flops)
            r["max_abs_diff_vs_default"] = float((fn().float() - ref.float()).abs().max())
        except Exception as e:  # noqa: BLE001  (a variant that does not compile is recorded, not fatal)
            r = {"error": repr(e)[:300]}
        res["alone"][name] = r
    for name, cfg in ups.items():
        alone(name, lambda cfg=cfg: gg.grouped_gemm(xs, w13, counts, swiglu=True, config=cfg), f1, h0)
    for name, cfg in downs.items():
        alone(name, lambda cfg=cfg: gg.grouped_gemm(h0, w2, counts, row_scale=scale, config=cfg), f2, y0)
    del xs, h0, y0, w13, w2, scale                                  # 5 GB, before the layer and the model
    torch.cuda.empty_cache()
    ran = [n for n, r in res["alone"].items() if "error" not in r]
    if not {"gate/up default", "down default"} <= set(ran):
        return res                                                  # no default to compare with
    ran = [n for n in ran if "persistent" in n]
    if not any(n.startswith("gate/up") for n in ran) or not any(n.startswith("down") for n in ran):
        return res
    best_up = min((n for n in ran if n.startswith("gate/up")), key=lambda n: res["alone"][n]["sustained_ms"])
    best_down = min((n for n in ran if n.startswith("down")), key=lambda n: res["alone"][n]["sustained_ms"])
    # only a persistent variant that beat the default alone (sustained) goes into the A/B
    if res["alone"][best_up]["sustained_ms"] >= res["alone"]["gate/up default"]["sustained_ms"]:
        best_up = "gate/up default"
    if res["alone"][best_down]["sustained_ms"] >= res["alone"]["down default"]["sustained_ms"]:
        best_down = "down default"
    res["picked"] = [best_up, best_down]
    if best_up == "gate/up default" and best_down == "down default":
        return res

    def with_configs(fwd, up, down):
        def fn():
            gg.GATE_UP_CONFIG, gg.DOWN_CONFIG = up, down
            return fwd()
        return fn
    try:
        layer, x = make_layer(dev)
        a = with_configs(lambda: layer(x), up0, down0)
        b = with_configs(lambda: layer(x), ups[best_up], downs[best_down])
        same = bool(torch.equal(a(), b()))
        res["layer"] = interleaved({"default": a, "persistent": b}, rounds=10, iters=20)
        res["layer"]["outputs_equal"] = same
        del layer, x
        torch.cuda.empty_cache()
        model, fwd = hunyuan_case()
        model.compile()
        a = with_configs(fwd, up0, down0)
        b = with_configs(fwd, ups[best_up], downs[best_down])
        same = bool(torch.equal(a(), b()))
        res["hunyuan forward compiled"] = interleaved({"default": a, "persistent": b}, rounds=8, iters=5)
        res["hunyuan forward compiled"]["outputs_equal"] = same
    finally:
        gg.GATE_UP_CONFIG, gg.DOWN_CONFIG = up0, down0
    return res


def projections_ab() -> dict:
    """The self-attention projections of hunyuan_like (8192 rows, hidden 4096, bf16, with bias) as
    two GEMMs (q, then k|v: what Attention runs) against one fused q|k|v GEMM, taking turns; and
    the output projection. Milliseconds per call and TFLOP/s."""
    import torch.nn.functional as F
    dev = torch.device("cuda")
    T, H = 8192, 4096
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    wq, wkv = (torch.randn(n, H, device=dev, dtype=torch.bfloat16) * H ** -0.5 for n in (H, 2 * H))
    bq, bkv = torch.zeros(H, device=dev, dtype=torch.bfloat16), torch.zeros(2 * H, device=dev, dtype=torch.bfloat16)
    wqkv, bqkv = torch.cat([wq, wkv]), torch.cat([bq, bkv])
    fns = {"q then kv (two GEMMs)": lambda: (F.linear(x, wq, bq), F.linear(x, wkv, bkv)),
           "fused qkv (one GEMM)": lambda: F.linear(x, wqkv, bqkv),
           "out projection": lambda: F.linear(x, wq, bq)}
    res = interleaved(fns, rounds=10, iters=20)
    flops = {"q then kv (two GEMMs)": 2 * T * H * 3 * H, "fused qkv (one GEMM)": 2 * T * H * 3 * H,
             "out projection": 2 * T * H * H}
    for name, r in res.items():
        r["tflops"] = flops[name] / r["median_ms"] / 1e9
    return res


def layouts() -> dict:
    """Each GEMM variant of the module docstring in a burst and sustained."""
    import dataclasses
    dev = torch.device("cuda")
    rows = routed_rows(dev)
    x, ri, counts, xs, w13, w2, scale = (rows[n] for n in ("x", "ri", "counts", "xs", "w13", "w2", "scale"))
    f1, f2 = gemm_flops(rows)
    M, H = xs.shape
    Fh = w2.shape[1]
    up = gg.GATE_UP_CONFIG
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
    gather_cfg = dataclasses.replace(up, gather_on_load=True)
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
        if not flops:                                               # a copy: no TFLOP/s
            r["burst_tflops"] = r["sustained_tflops"] = None
        res["cases"][name] = r
        print(f"{name:58s} burst {r['burst_ms']:7.3f} ms {r['burst_tflops'] or 0:5.0f} TF "
              f"@{r['burst_sm_mhz']} | sustained {r['sustained_ms']:7.3f} ms "
              f"{r['sustained_tflops'] or 0:5.0f} TF @{r['sustained_sm_mhz']}", flush=True)
    return res




def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--persistent", action="store_true",
                      help="the persistent GEMMs against the defaults: alone, then in the layer and the compiled "
                           "hunyuan_like forward, taking turns")
    mode.add_argument("--projections", action="store_true",
                      help="the attention projections: q and k|v as two GEMMs vs one fused q|k|v GEMM")
    args = p.parse_args()
    if args.projections:
        res = projections_ab()
        for name, r in res.items():
            print(f"{name:28s} {r['median_ms']:7.3f} ms {r['tflops']:5.0f} TFLOP/s  turns {r['turns_ms']}")
        if args.json:
            write_json_atomic(args.json, res)
        return
    if args.persistent:
        res = persistent_ab()
        for name, r in res["alone"].items():
            if "error" in r:
                print(f"{name:34s} {r['error']}")
                continue
            print(f"{name:34s} burst {r['burst_ms']:7.3f} ms {r['burst_tflops']:5.0f} TF @{r['burst_sm_mhz']} | "
                  f"sustained {r['sustained_ms']:7.3f} ms {r['sustained_tflops']:5.0f} TF @{r['sustained_sm_mhz']} "
                  f"| diff {r['max_abs_diff_vs_default']:.1e}")
        print("picked:", res.get("picked"))
        for name in ("layer", "hunyuan forward compiled"):
            if name in res:
                r = res[name]
                print(name, {k: (v["median_ms"] if isinstance(v, dict) else v) for k, v in r.items()})
                print("   turns:", {k: v["turns_ms"] for k, v in r.items() if isinstance(v, dict)})
        if args.json:
            write_json_atomic(args.json, res)
        return
    res = layouts()
    if args.json:
        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
