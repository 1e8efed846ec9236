"""Sweep the grouped GEMMs' tile configurations, one (K, N) at a time (issue 31 part 4; GPU only).

    python benchmarks/gemm_sweep.py anchor            # or hidream; gpu_runs.sh gemm-sweep runs both

Each family has two GEMMs, each timed through `grouped_gemm` as the layer calls it:
  * gate/up with the row index (so a configuration that copies x[row_index] first pays the copy,
    and one that gathers rows on load does not), SwiGLU epilogue;
  * down with the routed weights' scale epilogue.
Round 1 times every configuration of the grid that fits the shared memory and the registers once
(GROUP_M 8); the best 4, each also with GROUP_M 4 and 16, and the shipped one then run 3 interleaved
rounds (clocks drift), best of 3 kept. Round 1 stops after ROUND1_BUDGET_S (grid order: tiles
of the shipped size first; the JSON says how many were swept). HiDream's finalists are also timed
at 4096 and 16384 tokens: a configuration may be chosen per (K, N, dtype, GPU) only, never per row
count (grouped_gemm.py's batch-invariance argument), so the pick must hold at every row count: the finalist with the lowest
mean time relative to the shipped one over every row count, if 1% better. Then the whole layer, in a
CUDA graph, with the shipped configurations and with the picks, side by side (outputs compared), and
the picks as TUNED_CONFIGS entries (kernels/gemm_configs.py). Writes ${OUT:-.}/gemm_sweep_<family>.json
and prints the finalists.
"""
import dataclasses
import itertools
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# family -> (tokens, experts, top-k, hidden, expert hidden, renormalise, other token counts to check)
FAMILIES = {"anchor": (8192, 64, 8, 4096, 3072, True, ()),
            "hidream": (8192, 4, 2, 2560, 6912, False, (4096, 16384))}
ROUND1_BUDGET_S = 75          # per GEMM: a family fits about 4.5 minutes
SMEM_BYTES = 220 * 1024        # Hopper: 227 KB per block, less Triton's barriers and scratch


def grid(GemmConfig, gate_up: bool) -> list:
    """Every configuration worth a compile: an output tile of at least 128 x 128 (accumulators
    included), that fits shared memory (stages x the A and B tiles) and keeps the fp32
    accumulators at <= 128 registers a thread."""
    out = []
    accs = 2 if gate_up else 1
    for bm, bn, bk, warps, stages, ws in itertools.product(
            (64, 128, 256), (64, 128, 256), (64, 128), (4, 8), (3, 4, 5), (False, True)):
        if (gate_up and bn == 256) or accs * bm * bn < 128 * 128:
            continue
        smem = stages * (bm * bk + accs * bk * bn) * 2
        regs = accs * bm * bn // (warps * 32)
        if smem > SMEM_BYTES or regs > 128:
            continue
        # down has no row index, so the gather flag is unused there: keep DOWN_CONFIG's value, or the
        # shipped configuration and its twin would be timed as two finalists
        variants = [dict(gather_on_load=False)] if gate_up else [dict()]
        if gate_up and not ws:
            variants.append(dict(gather_on_load=True))       # pointer-gathered A, TMA for the weights
        for extra in variants:
            out.append(GemmConfig(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                                  desc=True, warp_specialize=ws, **extra))
    # output tiles of 128 x 256 (the shipped shape) first, then larger, then smaller: what a cut
    # round 1 leaves out is the least likely to win
    return sorted(out, key=lambda c: abs(math.log2(accs * c.BM * c.BN) - 15))


def name(c) -> str:
    return (f"BM{c.BM} BN{c.BN} BK{c.BK} G{c.GROUP_M} w{c.num_warps} s{c.num_stages}"
            f"{' ws' if c.warp_specialize else ''}{' gather' if c.gather_on_load else ''}")


def inputs(T, E, k, H, F, renorm, dev):
    from moe_ep.config import MoEConfig
    from moe_ep.experts import init_expert_weights
    from moe_ep.layer import MoELayer
    from moe_ep.parallel import ParallelContext

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden_size=F, score_func="softmax", renormalize=renorm)
    layer = MoELayer(H, cfg, ParallelContext(device=dev), dtype=torch.bfloat16)
    layer.router.gate.weight.data.normal_(std=0.02)
    layer.load_expert_weights(lambda e: init_expert_weights(0, 0, e, H, F, torch.bfloat16, dev))
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        _, ids = layer.router(x)
    counts = torch.bincount(ids.reshape(-1), minlength=E).to(torch.int64)
    order = torch.argsort(ids.reshape(-1), stable=True)
    M = T * k
    return dict(layer=layer, x=x, rows=order // k, counts=counts, w13=layer.experts.w13, w2=layer.experts.w2,
                h=torch.randn(M, F, device=dev, dtype=torch.bfloat16), scale=torch.rand(M, device=dev))


def runner(grouped_gemm, d, gate_up: bool, c):
    if gate_up:
        return lambda: grouped_gemm(d["x"], d["w13"], d["counts"], swiglu=True, row_index=d["rows"], config=c)
    return lambda: grouped_gemm(d["h"], d["w2"], d["counts"], row_scale=d["scale"], config=c)


def main() -> int:
    if not torch.cuda.is_available():
        print("gemm_sweep.py needs a CUDA GPU (Triton grouped GEMMs)", file=sys.stderr)
        return 2
    family = sys.argv[1] if len(sys.argv) > 1 else "anchor"
    if family not in FAMILIES:
        print(f"gemm_sweep.py: family must be one of {sorted(FAMILIES)}, got {family!r}", file=sys.stderr)
        return 2
    from bench import ev_time   # benchmarks/bench.py, beside this script
    from moe_ep.atomic import write_json_atomic
    from moe_ep.kernels.gemm_configs import GemmConfig, capability, config_for
    from moe_ep.kernels.grouped_gemm import grouped_gemm

    dev = torch.device("cuda")
    T, E, k, H, F, renorm, others = FAMILIES[family]
    d = inputs(T, E, k, H, F, renorm, dev)
    other_inputs = {t: inputs(t, E, k, H, F, renorm, dev) for t in others}
    result = {"family": family, "gpu": torch.cuda.get_device_name(), "tokens": T, "experts": E, "top_k": k,
              "hidden": H, "expert_hidden": F}
    t_start = time.perf_counter()
    picks = {}
    for role, gate_up, w in (("gate_up", True, d["w13"]), ("down", False, d["w2"])):
        shipped = config_for(role, w)                  # what the layer runs now at this (K, N)
        flops = 2 * T * k * H * F * (2 if gate_up else 1)
        first, configs = {}, grid(GemmConfig, gate_up)
        t_role = time.perf_counter()
        for c in configs:
            if time.perf_counter() - t_role > ROUND1_BUDGET_S:     # compiles dominate: keep the call's limit
                print(f"{family} {role}: round 1 stopped at {len(first)} of {len(configs)} configurations "
                      f"after {ROUND1_BUDGET_S} s", flush=True)
                break
            try:
                first[c] = ev_time(runner(grouped_gemm, d, gate_up, c), iters=5, warm=2)
            except Exception as e:  # noqa: BLE001 - a configuration that cannot compile or run
                print(family, role, name(c), "failed:", repr(e)[:160], flush=True)
        top = sorted(first, key=first.get)[:4]
        finalists = [shipped] + [dataclasses.replace(c, GROUP_M=g) for c in top for g in (4, 8, 16)]
        finalists = list(dict.fromkeys(finalists))
        times = {c: [] for c in finalists}
        for _ in range(3):
            for c in finalists:
                try:
                    times[c].append(ev_time(runner(grouped_gemm, d, gate_up, c), iters=10, warm=2))
                except Exception as e:  # noqa: BLE001
                    print(family, role, name(c), "failed:", repr(e)[:160], flush=True)
        best = {c: min(v) for c, v in times.items() if v}
        rows = []
        for c in sorted(best, key=best.get):
            row = {"config": dataclasses.asdict(c), "name": name(c), "ms": best[c],
                   "tflops": flops / best[c] / 1e9, "shipped": c == shipped}
            for t, od in other_inputs.items():
                row[f"ms_at_{t}"] = ev_time(runner(grouped_gemm, od, gate_up, c), iters=10, warm=2)
            rows.append(row)
            print(f"{family} {role:7s} {row['ms']:7.3f} ms {row['tflops']:5.0f} TFLOP/s  {row['name']}"
                  f"{'  (shipped)' if row['shipped'] else ''}"
                  + "".join(f"  @{t}: {row[f'ms_at_{t}']:.3f}" for t in other_inputs), flush=True)
        pick = choose(rows, list(other_inputs))
        if pick is not None:
            picks[(role, w.shape[1], w.shape[2], w.dtype, capability(w.device)[0])] = pick
        result[role] = {"swept": len(first), "of": len(configs), "finalists": rows,
                        "pick": None if pick is None else dataclasses.asdict(pick),
                        "round1": {name(c): v for c, v in sorted(first.items(), key=lambda kv: kv[1])}}
        result["seconds"] = time.perf_counter() - t_start
        write_json_atomic(os.path.join(os.environ.get("OUT", "."), f"gemm_sweep_{family}.json"), result)
    print(f"{family}: swept in {result['seconds']:.0f} s", flush=True)
    if picks:
        result["layer_ab"] = {str(t): layer_ab(od["layer"], od["x"], picks) for t, od in [(T, d), *other_inputs.items()]}
        for t, ab in result["layer_ab"].items():
            print(f"{family} layer at {t} tokens, CUDA graph: shipped {ab['shipped_ms']:.3f} ms, picks "
                  f"{ab['picked_ms']:.3f} ms ({ab['shipped_ms'] / ab['picked_ms']:.3f}x), outputs equal: {ab['equal']}",
                  flush=True)
        print("TUNED_CONFIGS entries:", flush=True)
        for key, c in picks.items():
            print(f"    {key!r}: {c!r},", flush=True)
        write_json_atomic(os.path.join(os.environ.get("OUT", "."), f"gemm_sweep_{family}.json"), result)
    return 0


def choose(rows: list[dict], others: list[int]):
    """The finalist with the lowest mean time relative to the shipped configuration over every row
    count timed, if that is at least 1% better; else None (keep the shipped one)."""
    from moe_ep.kernels.gemm_configs import GemmConfig
    shipped = next((r for r in rows if r["shipped"]), None)
    if shipped is None:
        return None
    cols = ["ms"] + [f"ms_at_{t}" for t in others]
    score = lambda r: statistics.mean(r[c] / shipped[c] for c in cols)   # noqa: E731
    best = min(rows, key=score)
    return GemmConfig(**best["config"]) if score(best) < 0.99 else None


def layer_ab(layer, x, picks: dict, rounds: int = 5) -> dict:
    """The whole layer in a CUDA graph with the shipped configurations and with the picks, captured
    side by side and timed in alternating rounds (clocks drift); outputs compared bit for bit."""
    from bench import ev_time, layer_graph   # benchmarks/bench.py, beside this script
    from moe_ep.kernels.gemm_configs import TUNED_CONFIGS
    saved = dict(TUNED_CONFIGS)
    try:
        shipped = layer_graph(layer, x)
        TUNED_CONFIGS.update(picks)
        picked = layer_graph(layer, x)
    finally:
        TUNED_CONFIGS.clear()
        TUNED_CONFIGS.update(saved)
    equal = torch.equal(shipped(x), picked(x))
    a, b = [], []
    for _ in range(rounds):
        a.append(ev_time(lambda: shipped(x), iters=20))
        b.append(ev_time(lambda: picked(x), iters=20))
    return {"shipped_ms": statistics.median(a), "picked_ms": statistics.median(b), "equal": equal}


if __name__ == "__main__":
    sys.exit(main())
