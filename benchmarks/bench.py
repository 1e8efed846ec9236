"""MoE-layer benchmarks: moe-ep vs DeepSpeed-MoE (`deepspeed.moe.layer.MoE`) on the same
sizes, the same gate weights and the same expert weights, in one run.

    # 2 CPU ranks (the table in docs/benchmarks.md)
    deepspeed --num_gpus 2 benchmarks/bench.py layer --tokens 2048 --hidden 256 --expert-hidden 192
    # one GPU, the HunyuanImage-like shape
    python benchmarks/bench.py layer --device cuda --dtype bfloat16 --tokens 8192 --hidden 4096 --expert-hidden 3072
    # a full sampling step of a model preset: time per step, MoE share, memory per GPU
    # (--cuda-graph: also eager vs the forward replayed from a CUDA graph, EP = 1)
    python benchmarks/bench.py step --config configs/hunyuan_like.json --set sampling.batch_size=4 --cuda-graph

Prints one table row per system (median forward time, max over ranks per iteration), and
checks that both systems compute the same function (relative error of the outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import MoEConfig, ParallelConfig  # noqa: E402
from moe_ep.experts import init_expert_weights, swiglu  # noqa: E402
from moe_ep.layer import MoELayer  # noqa: E402
from moe_ep.parallel import init_distributed  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SwiGLUExpert(nn.Module):
    """One expert as DeepSpeed-MoE wants it (a module it deep-copies per local expert)."""

    def __init__(self, hidden: int, inner: int, dtype):
        super().__init__()
        self.w13 = nn.Parameter(torch.zeros(hidden, 2 * inner, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(inner, hidden, dtype=dtype), requires_grad=False)

    def forward(self, x):
        return swiglu(x, self.w13, self.w2)


DENSE_ROW = "dense mm, same FLOPs (yardstick)"


def skewed_gate_(gate_weight: torch.Tensor, s: float, seed: int) -> None:
    """docs/anchors.md recipe: channel 0 of the input is 1; its gate weights are a Zipf log-bias
    -s*log(rank) over a random expert order, so every token carries the same bias."""
    E = gate_weight.shape[0]
    order = torch.randperm(E, generator=torch.Generator().manual_seed(seed + 1))
    bias = -s * torch.log(torch.arange(1, E + 1, dtype=torch.float32))
    gate_weight[order, 0] = bias.to(gate_weight.dtype)


def make_input(tokens: int, hidden: int, rank: int, dtype, device, skew: float) -> torch.Tensor:
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(100 + rank))
    if skew:
        x[:, 0] = 1.0
    return x.to(device=device, dtype=dtype)


def expert_load_ratio(ids: torch.Tensor, num_experts: int, group) -> float:
    """max / mean expert load over the EP group."""
    counts = torch.bincount(ids.flatten().cpu(), minlength=num_experts).to(torch.float64)
    if group is not None:
        dist.all_reduce(counts, group=group)
    return float(counts.max() / counts.mean().clamp_min(1e-9))


def time_forward(fn, x, iters: int, warmup: int, device) -> list[float]:
    """Per-iteration milliseconds, the max over ranks (a forward ends when the slowest rank ends)."""
    times = []
    for i in range(warmup + iters):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(elapsed))
    return times


def back_to_back_ms(fn, x, iters: int) -> float:
    """CUDA: mean milliseconds per forward with `iters` forwards queued back to back (one sync at
    the end), as the layers of a model run: the CPU launches the next forward's kernels while
    the GPU still runs this one's, so launch latency and idle clocks between forwards are hidden."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def ev_time(fn, iters: int = 20, warm: int = 5) -> float:
    """CUDA: median milliseconds of `fn` alone (CUDA events around each call, a sync after each)."""
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


def init_device(ctx):
    """Make expert weights on the GPU when there is one (CPU generation of 64 large experts is slow)."""
    return ctx.device if ctx.device.type == "cuda" else None


def build_deepspeed_moe(args, ctx, gate_weight, dtype, drop_tokens: bool):
    from deepspeed.moe.layer import MoE

    moe = MoE(args.hidden, SwiGLUExpert(args.hidden, args.expert_hidden, dtype), num_experts=args.experts,
              ep_size=ctx.ep_size, k=args.top_k, capacity_factor=1.0, eval_capacity_factor=1.0,
              min_capacity=0, drop_tokens=drop_tokens)
    moe.set_deepspeed_parallelism()
    moe.eval()
    moe.deepspeed_moe.gate.wg.weight.data.copy_(gate_weight.float())
    local = args.experts // ctx.ep_size
    for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        w13, w2 = init_expert_weights(args.seed, 0, ctx.ep_rank * local + i, args.hidden, args.expert_hidden, dtype,
                                      init_device(ctx))
        expert.w13.data.copy_(w13)
        expert.w2.data.copy_(w2)
    return moe.to(ctx.device)


def layer_graph(layer, x):
    """The EP = 1 layer on input x captured in a CUDA graph: a function that replays it and
    returns the graph's output (capture fails on any host sync)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = layer(x)

    def replay(_):
        graph.replay()
        return out
    return replay


def bench_layer(args) -> list[dict]:
    ctx = init_distributed(ParallelConfig(device=args.device, timeout_s=600))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_hidden_size=args.expert_hidden,
                    score_func="softmax", renormalize=args.renormalize)
    ours = MoELayer(args.hidden, cfg, ctx, num_redundant=0, dtype=dtype)
    gate = torch.randn(args.experts, args.hidden, generator=torch.Generator().manual_seed(args.seed)) * 0.02
    if args.skew:
        skewed_gate_(gate, args.skew, args.seed)
    ours.router.gate.weight.data.copy_(gate.to(dtype))
    ours.load_expert_weights(lambda e: init_expert_weights(args.seed, 0, e, args.hidden, args.expert_hidden, dtype,
                                                           init_device(ctx)))
    x = make_input(args.tokens, args.hidden, ctx.rank, dtype, ctx.device, args.skew)
    with torch.no_grad():
        _, ids = ours.router(x)
    load_ratio = expert_load_ratio(ids, args.experts, ctx.ep_group)

    rows = []
    def variant(dedup, overlap=False, invariant=False):   # EP > 1: one row per (token, destination rank) or per copy
        def fn(t):
            ours.dedup_tokens, ours.overlap_own_rows, ours.batch_invariant = dedup, overlap, invariant
            return ours(t)
        return fn

    # the fast path first (at EP > 1: one row per (token, destination rank), this rank's own rows
    # computed while the others travel); the ratios are against it
    systems = [("moe-ep (dropless)", variant(True, True))]
    # model.moe.batch_invariant "auto" is on for CPU ranks (moe_ep/batch_invariant.py): its row by
    # default there; --batch-invariant-row yes times it on a GPU too
    if args.batch_invariant_row == "yes" or (args.batch_invariant_row == "auto" and ctx.device.type == "cpu"):
        systems.append(("moe-ep, batch-invariant", variant(True, True, invariant=True)))
    if ctx.ep_size > 1:
        systems.append(("moe-ep, exchange then compute", variant(True, False)))
        systems.append(("moe-ep, one row per copy (no dedup)", variant(False)))
    if ctx.device.type == "cuda" and ctx.ep_size == 1:
        try:
            systems.append(("moe-ep (dropless), CUDA graph", layer_graph(ours, x)))
        except RuntimeError as e:        # a kernel that cannot be captured: report it, time the rest
            print(f"CUDA graph capture failed, the graph row is left out: {e}", file=sys.stderr)
    if not args.skip_deepspeed:
        for drop in ([False, True] if args.with_capacity else [False]):
            ds = build_deepspeed_moe(args, ctx, gate, dtype, drop_tokens=drop)
            name = "DeepSpeed-MoE drop_tokens=False" if not drop else "DeepSpeed-MoE capacity 1.0 (drops)"
            systems.append((name, lambda t, ds=ds: ds(t)[0]))
    if ctx.device.type == "cuda":     # the yardstick: one dense GEMM with the experts' FLOPs, same clocks
        rows_a = torch.randn(args.tokens * args.top_k, args.hidden, device=ctx.device, dtype=dtype)
        cols_b = torch.randn(args.hidden, 3 * args.expert_hidden, device=ctx.device, dtype=dtype)
        systems.append((DENSE_ROW, lambda t: rows_a @ cols_b))
    ref = None
    with torch.no_grad():
        for name, fn in systems:
            out = fn(x).float()
            wire = ours.wire_rows if name.startswith("moe-ep") else None   # rows this rank sent to others
            if ref is None:
                ref = out
            rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30)) if name != DENSE_ROW else None
            times = time_forward(fn, x, args.iters, args.warmup, ctx.device)
            queued = back_to_back_ms(fn, x, args.iters) if ctx.device.type == "cuda" and ctx.world_size == 1 else None
            rows.append({"system": name, "median_ms": statistics.median(times), "min_ms": min(times),
                         "back_to_back_ms": queued, "rel_err_vs_moe_ep": rel, "rows_sent_to_peers": wire})
    floor_ms = None
    if ctx.device.type == "cuda":
        flops = 2 * 3 * args.tokens * args.top_k * args.hidden * args.expert_hidden
        floor_ms = flops / (args.peak_tflops * 1e12) * 1e3
    meta = {"ranks": ctx.world_size, "ep": ctx.ep_size, "device": str(ctx.device), "dtype": args.dtype,
            "renormalize": args.renormalize,
            "tokens_per_rank": args.tokens, "hidden": args.hidden, "expert_hidden": args.expert_hidden,
            "experts": args.experts, "top_k": args.top_k, "skew": args.skew,
            "max_over_mean_expert_load": round(load_ratio, 2), "floor_ms": floor_ms,
            "threads_per_rank": torch.get_num_threads()}
    if ctx.is_main:
        print(json.dumps(meta))
        base = rows[0]["median_ms"]
        print(f"{'system':40s} {'median ms':>10s} {'min ms':>9s} {'vs moe-ep':>10s} {'rel err':>9s} {'rows out':>9s}"
              f" {'queued ms':>10s}")
        for r in rows:
            wire = "" if r["rows_sent_to_peers"] is None else str(r["rows_sent_to_peers"])
            queued = "" if r["back_to_back_ms"] is None else f"{r['back_to_back_ms']:.2f}"
            print(f"{r['system']:40s} {r['median_ms']:10.2f} {r['min_ms']:9.2f} {r['median_ms'] / base:9.2f}x "
                  f"{'' if r['rel_err_vs_moe_ep'] is None else format(r['rel_err_vs_moe_ep'], '9.1e'):>9s} {wire:>9s} {queued:>10s}")
        if args.json:
            write_json_atomic(args.json, {"meta": meta, "rows": rows})
    return rows


def bench_step(args) -> dict:
    """Per-step latency of the whole transformer forward (CFG batched) and peak memory."""
    from moe_ep import config as config_mod
    from moe_ep.models.moedit.dit import MoEDiT
    from moe_ep.models.moedit.sampler import FlowMatchEulerScheduler, MoEDiTPipeline
    from moe_ep.models.moedit.text import PromptEncoder
    from moe_ep.timing import PhaseTimer

    cfg = config_mod.load(args.config, args.set)
    ctx = init_distributed(cfg.parallel)
    model = MoEDiT(cfg.model, ctx, num_redundant=cfg.eplb.num_redundant_experts)
    model.init_from_seed(expert_device=init_device(ctx))
    if cfg.model.compile:
        model.compile()
    pipe = MoEDiTPipeline(model, PromptEncoder(cfg.model, model.text_encoder, ctx.device, model.dtype),
                          FlowMatchEulerScheduler(cfg.sampling.shift))
    s = cfg.sampling
    prompts = (s.prompts * s.batch_size)[:s.batch_size]
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    run = lambda steps, **hooks: pipe(prompts, num_inference_steps=steps, guidance_scale=s.guidance_scale,  # noqa: E731
                                      height=s.height, width=s.width, **hooks)
    run(2)  # warm-up
    timers = [PhaseTimer(ctx.device) for _ in model.moe_layers()]
    for layer, timer in zip(model.moe_layers(), timers):
        layer.timer = timer
    times, t0 = [], [0.0]

    def begin(i, t, info):
        sync()
        t0[0] = time.perf_counter()

    def end(i, t, info):
        sync()
        times.append((time.perf_counter() - t0[0]) * 1e3)

    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(args.steps, callback_on_forward_begin=begin, callback_on_forward_end=end)
    moe_ms = sum(sum(t.collect().values()) for t in timers) / args.steps
    rows = len(prompts) * 2 * (s.height // cfg.model.vae_scale_factor // cfg.model.patch_size) * \
        (s.width // cfg.model.vae_scale_factor // cfg.model.patch_size)
    result = {"config": args.config, "overrides": args.set, "ranks": ctx.world_size, "ep": ctx.ep_size,
              "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu",
              "moe_layers": len(model.moe_layers()), "rows_per_forward": rows,
              "step_ms_median": statistics.median(times), "moe_ms_per_step": moe_ms,
              "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2 ** 30) if ctx.device.type == "cuda" else None,
              "expert_weights_gib": sum(l.experts.w13.numel() + l.experts.w2.numel() for l in model.moe_layers())
              * model.moe_layers()[0].experts.w13.element_size() / 2 ** 30}
    if args.cuda_graph:
        result.update(eager_vs_cuda_graph(pipe, model, run, begin, end, times))
    if ctx.is_main:
        print(json.dumps(result))
        if args.json:
            write_json_atomic(args.json, result)
    return result


def eager_vs_cuda_graph(pipe, model, run, begin, end, times: list) -> dict:
    """Step time eager (no phase timers; the shared expert on its side stream, then inline) and with
    the transformer forward replayed from a CUDA graph, in one process, same prompts and seeds; and
    how far the final latents differ."""
    from moe_ep.models.moedit.graphs import CudaGraphForward

    for layer in model.moe_layers():
        layer.timer = None
    steps = len(times) if times else 5

    def timed():
        times.clear()
        latents = run(steps, callback_on_forward_begin=begin, callback_on_forward_end=end)
        return latents, statistics.median(times)

    eager_latents, eager_ms = timed()
    for layer in model.moe_layers():             # the shared expert inline, after the routed path
        layer.shared_side_stream = False
    try:
        inline_latents, inline_ms = timed()
    finally:
        for layer in model.moe_layers():
            layer.shared_side_stream = True
    res = {"eager_step_ms_median": eager_ms, "eager_shared_inline_step_ms_median": inline_ms,
           "shared_inline_vs_side_stream_max_abs_diff": float((inline_latents - eager_latents).abs().max())}
    pipe.transformer = CudaGraphForward(model)
    try:
        run(2)                                   # captures (once per input shape)
        graph_latents, graph_ms = timed()
    except RuntimeError as e:                    # a kernel that cannot be captured: keep the eager figures
        res["cuda_graph_error"] = str(e)[:500]
        return res
    finally:
        pipe.transformer = model
    return {**res, "cuda_graph_step_ms_median": graph_ms,
            "graph_vs_eager_max_abs_diff": float((graph_latents - eager_latents).abs().max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    sub = p.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layer", help="one MoE layer forward: moe-ep vs DeepSpeed-MoE")
    lay.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    lay.add_argument("--hidden", type=int, default=256)
    lay.add_argument("--expert-hidden", type=int, default=192)
    lay.add_argument("--experts", type=int, default=64)
    lay.add_argument("--top-k", type=int, default=8)
    lay.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    lay.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    lay.add_argument("--iters", type=int, default=10)
    lay.add_argument("--warmup", type=int, default=3)
    lay.add_argument("--no-renormalize", dest="renormalize", action="store_false",
                     help="top-k weights as the softmax gives them (HiDream-I1), not renormalised to sum 1")
    lay.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of the gate bias (0: random gate)")
    lay.add_argument("--seed", type=int, default=0)
    lay.add_argument("--with-capacity", action="store_true", help="also DeepSpeed with capacity factor 1.0")
    lay.add_argument("--skip-deepspeed", action="store_true")
    lay.add_argument("--batch-invariant-row", choices=["auto", "yes", "no"], default="auto",
                     help="time the batch-invariant path too (model.moe.batch_invariant on); auto: on a CPU")
    lay.add_argument("--peak-tflops", type=float, default=781.0, help="dense GEMM rate for the floor (docs/anchors.md)")
    lay.add_argument("--json", help="also write the rows to this file (rank 0)")
    st = sub.add_parser("step", help="a full sampling step of a model preset")
    st.add_argument("--config", required=True)
    st.add_argument("--set", action="append", default=[], help="section.key=value override")
    st.add_argument("--steps", type=int, default=5)
    st.add_argument("--cuda-graph", action="store_true",
                    help="also time the steps with the forward replayed from a CUDA graph (EP = 1, CUDA)")
    st.add_argument("--json")
    args = p.parse_args(argv)
    {"layer": bench_layer, "step": bench_step}[args.cmd](args)


if __name__ == "__main__":
    main()
