"""Where the GPU time of the MoE layer and of a hunyuan_like forward goes, kernel by kernel
(torch.profiler): per forward, the wall time (CUDA events), the time some kernel is running
(union of kernel intervals on any stream), the idle gaps, and the kernels that take the most time.

    python launch/gpu_profile.py [--json out.json]      # needs a CUDA GPU; world of one
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # gpu_check's layer builder

from moe_ep.atomic import write_json_atomic  # noqa: E402


def kernel_intervals(prof) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every device kernel/memcpy/memset the profiler saw."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
            out.append((e.name(), e.start_ns(), e.start_ns() + e.duration_ns()))
    return out


def busy_ns(intervals) -> int:
    """Length of the union of the intervals (time at least one kernel runs)."""
    total, end = 0, None
    for _, s, e in sorted(intervals, key=lambda t: t[1]):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def short(name: str) -> str:
    return name if len(name) <= 90 else name[:87] + "..."


def profile_fn(fn, iters: int, top: int = 25) -> dict:
    """Run fn `iters` times under the profiler (after 3 warm-ups): per-iteration wall (CUDA events),
    busy time, sum of kernel times, and the top kernels by total time."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
    ivs = kernel_intervals(prof)
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, s, e in ivs:
        by_name[name].append((e - s) / 1e6)
    rows = sorted(((sum(v) / iters, len(v) / iters, n) for n, v in by_name.items()), reverse=True)
    return {"wall_ms_per_iter": start.elapsed_time(end) / iters,
            "busy_ms_per_iter": busy_ns(ivs) / 1e6 / iters,
            "kernel_sum_ms_per_iter": sum(e - s for _, s, e in ivs) / 1e6 / iters,
            "kernels_per_iter": len(ivs) / iters,
            "top": [{"ms_per_iter": round(ms, 4), "calls_per_iter": c, "kernel": short(n)} for ms, c, n in rows[:top]]}


def events_each(fn, iters: int, idle_s: float = 0.0) -> list[float]:
    """Milliseconds of each of `iters` calls (CUDA events around it, a sync after it), with
    `idle_s` seconds of idle GPU before each."""
    import time
    ts = []
    for _ in range(iters):
        if idle_s:
            time.sleep(idle_s)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))  # noqa: E702
    return ts


def median_ms(fn, iters: int = 10) -> float:
    """Median of `iters` calls timed by events_each, after 3 warm-ups."""
    for _ in range(3):
        fn()
    return statistics.median(events_each(fn, iters))


def timing_modes(fn, iters: int = 20) -> dict:
    """The same forward timed four ways (milliseconds): CUDA events around each forward with a sync
    after it (median); the host's wall clock around each (median, as launch/bench.py layer); all
    queued back to back (mean); and events around each with 5 ms of idle GPU before it (median)."""
    import time

    from bench import back_to_back_ms
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev, wall = events_each(fn, iters), []
    for _ in range(iters):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize()  # noqa: E702
        wall.append((time.perf_counter() - t0) * 1e3)
    queued = back_to_back_ms(lambda _: fn(), None, iters)
    idle = events_each(fn, iters, idle_s=0.005)
    return {"events_sync_each": statistics.median(ev), "wall_sync_each": statistics.median(wall),
            "back_to_back": queued, "events_after_5ms_idle": statistics.median(idle)}


def sm_clock_mhz():
    """The GPU's current SM clock (NVML), or None without nvidia-ml-py."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    except Exception:  # noqa: BLE001
        return None


def sustained_vs_burst(fn, flops: float, burst_iters: int = 10, sustained_ms: float = 2000.0) -> dict:
    """fn timed in short bursts after idle (CUDA events, median, 50 ms of idle before each, as
    the hardware ceilings in docs/anchors.md were taken) and sustained (back to back for about
    `sustained_ms`, the mean of the last half), with the SM clock read at the end of each."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    burst = events_each(fn, burst_iters, idle_s=0.05)
    burst_clock = sm_clock_mhz()
    ms = statistics.median(burst)
    n = max(4, int(sustained_ms / ms))
    evs = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    evs[0].record()
    for i in range(n):
        fn()
        evs[i + 1].record()
    torch.cuda.synchronize()
    hot_clock = sm_clock_mhz()
    half = n // 2
    sustained = evs[half].elapsed_time(evs[n]) / (n - half)
    return {"burst_ms": ms, "burst_tflops": flops / ms / 1e9, "burst_sm_mhz": burst_clock,
            "sustained_ms": sustained, "sustained_tflops": flops / sustained / 1e9, "sustained_sm_mhz": hot_clock,
            "sustained_iters": n}


def layer_case():
    """The layer of launch/gpu_check.py (8192 tokens, 64 experts, top-8, H 4096, F 3072, bf16):
    (its forward, its forward replayed from a CUDA graph)."""
    from bench import layer_graph
    from gpu_check import make_layer
    layer, x = make_layer(torch.device("cuda"))
    replay = layer_graph(layer, x)
    return (lambda: layer(x)), (lambda: replay(x))


def hunyuan_case(batch: int = 4):
    """The transformer forward of configs/hunyuan_like.json on a CFG batch (2 * batch samples)."""
    from moe_ep import config as config_mod
    from moe_ep.models.moedit.dit import MoEDiT
    from moe_ep.parallel import ParallelContext

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_mod.load(os.path.join(root, "configs/hunyuan_like.json"), ["telemetry.wandb=false"])
    dev = torch.device("cuda")
    model = MoEDiT(cfg.model, ParallelContext(device=dev))
    model.init_from_seed(expert_device=dev)
    m = cfg.model
    side = cfg.sampling.height // m.vae_scale_factor
    g = torch.Generator(device=dev).manual_seed(0)
    B = 2 * batch
    x = torch.randn(B, m.in_channels, side, side, device=dev, generator=g)
    t = torch.full((B,), 0.5, device=dev)
    text = torch.randn(B, m.max_prompt_tokens, m.text_dim, device=dev, generator=g).to(model.dtype)
    mask = torch.ones(B, m.max_prompt_tokens, dtype=torch.bool, device=dev)
    mask[:, 16:] = False
    return model, (lambda: model(x, t, text, mask))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also with model.compile() (inductor; MoE layers eager)")
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    layer_fwd, layer_graph = layer_case()
    result["layer"] = profile_fn(layer_fwd, args.iters)
    result["layer_timing_modes_eager"] = timing_modes(layer_fwd)
    result["layer_timing_modes_graph"] = timing_modes(layer_graph)
    D = 8192
    a = torch.randn(D, D, device="cuda", dtype=torch.bfloat16)
    result["clocks_dense_gemm_8192"] = sustained_vs_burst(lambda: a @ a, 2 * D ** 3)
    del a
    result["clocks_layer_graph"] = sustained_vs_burst(layer_graph, 2 * 3 * 8192 * 8 * 4096 * 3072)
    model, fwd = hunyuan_case()
    result["hunyuan_forward"] = profile_fn(fwd, args.iters, top=40)
    for layer in model.moe_layers():
        layer.shared_side_stream = False
    result["hunyuan_forward_shared_inline"] = {"median_ms": median_ms(fwd)}
    for layer in model.moe_layers():
        layer.shared_side_stream = True
    result["hunyuan_forward_side_stream"] = {"median_ms": median_ms(fwd)}
    if args.compile:
        eager_out = fwd().float()
        model.compile()     # what model.compile = true does (moe_ep/models/moedit.py)
        diff = float((fwd().float() - eager_out).abs().max() / eager_out.abs().max())
        result["compiled_vs_eager_max_abs_diff_over_max"] = diff
        result["hunyuan_forward_compiled"] = {"median_ms": median_ms(fwd)}
        result["hunyuan_forward_compiled_profile"] = profile_fn(fwd, args.iters, top=40)
    for name, r in result.items():
        if isinstance(r, dict) and "top" in r:
            print(f"== {name}: wall {r['wall_ms_per_iter']:.3f} ms, busy {r['busy_ms_per_iter']:.3f}, "
                  f"kernel sum {r['kernel_sum_ms_per_iter']:.3f}, {r['kernels_per_iter']:.0f} kernels")
            for row in r["top"]:
                print(f"  {row['ms_per_iter']:8.4f} ms  x{row['calls_per_iter']:<5.1f} {row['kernel']}")
        else:
            print(name, r)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
