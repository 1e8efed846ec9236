"""MoE-layer throughput with and without online rebalancing: spawned CPU ranks (gloo), or one
rank per GPU under a launcher (NCCL; the same code path).

    python benchmarks/bench_rebalance.py --ranks 4            # the table in docs/benchmarks.md (section 3)
    deepspeed --num_gpus 2 benchmarks/bench_rebalance.py --device cuda --dtype bfloat16 --layers 2 \
        --experts 64 --top-k 8 --hidden 4096 --expert-hidden 3072 --tokens 8192 --redundant 8

A stack of MoE layers (moe_ep.layer.MoELayer) with a router skewed the way trained MoE
routers are: channel 0 of every token is 1 and the gate's weights on that channel are a
Zipf log-bias -s*log(rank) over a random expert order (s = 1.2 by default). Modes:

  none-R=E      no redundant slots, contiguous placement, no rebalancing
  none-R=E+r    r redundant slots (replicas of experts 0, 1, ...), no rebalancing
  online        r redundant slots; moe_ep.rebalance.Rebalancer with eplb.rebalance_experts,
                window = interval = --window forwards, min_gain 0.05
  phase-*       timestep-aware (--phases): channel 0 = t and channel 1 = 1 - t carry two
                different Zipf orders, so the hot experts change with the timestep; a
                sampling run of --steps forwards (t from 1 to 0) is repeated. `phase-static`
                plans one placement from all timesteps; `phase-model` plans one per bucket
                and switches when the cost model says it pays; `phase-forced` always switches.

Per mode: median forward time of the stack (max over ranks per forward), tokens/s over all
ranks, the logical expert load max/mean, and balancedness = mean/max of the token rows the
ranks' experts actually computed (measured, not modelled), over the timed forwards.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import DTYPES  # noqa: E402  (benchmarks/bench.py, beside this script)
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import EplbConfig, MoEConfig  # noqa: E402
from moe_ep.experts import init_expert_weights  # noqa: E402
from moe_ep.layer import MoELayer  # noqa: E402
from moe_ep.config import ParallelConfig  # noqa: E402
from moe_ep.parallel import ParallelContext, context_for_tests, init_distributed  # noqa: E402
from moe_ep.rebalance import Rebalancer  # noqa: E402
from moe_ep.stats import ExpertLoadStats  # noqa: E402


def zipf_bias_(gate_weight: torch.Tensor, channel: int, s: float, seed: int) -> None:
    E = gate_weight.shape[0]
    order = torch.randperm(E, generator=torch.Generator().manual_seed(seed))
    gate_weight[order, channel] = -s * torch.log(torch.arange(1, E + 1, dtype=torch.float32))


def build(ctx, a, redundant: int, phases: bool):
    layers = []
    dtype = DTYPES[a.dtype]
    cfg = MoEConfig(num_experts=a.experts, top_k=a.top_k, expert_hidden_size=a.expert_hidden)
    on_gpu = ctx.device if ctx.device.type == "cuda" else None     # 64 large experts are slow to make on a CPU
    for l in range(a.layers):
        torch.manual_seed(1000 + l)
        layer = MoELayer(a.hidden, cfg, ctx, num_redundant=redundant, layer_idx=l, dtype=dtype)
        with torch.no_grad():
            gate = layer.router.gate.weight.detach().float().cpu()    # zipf_bias_ writes CPU values into it
            zipf_bias_(gate, 0, a.skew, seed=17 + l)
            if phases:
                zipf_bias_(gate, 1, a.skew, seed=5017 + l)
            layer.router.gate.weight.copy_(gate)
        layer.load_expert_weights(lambda e, l=l: init_expert_weights(0, l, e, a.hidden, a.expert_hidden, dtype, on_gpu))
        rows = [0]
        layer.experts.register_forward_pre_hook(lambda m, args, rows=rows: rows.__setitem__(0, rows[0] + args[0].shape[0]))
        layer._rows = rows
        layers.append(layer)
    return layers


def make_x(a, ctx, fwd: int, t: float | None):
    x = torch.randn(a.tokens, a.hidden, generator=torch.Generator().manual_seed(7919 * fwd + ctx.rank))
    if t is None:
        x[:, 0] = 1.0
    else:
        x[:, 0], x[:, 1] = t, 1.0 - t
    return x.to(device=ctx.device, dtype=DTYPES[a.dtype])


def max_over_ranks(ctx, seconds: float) -> float:
    """The largest of every rank's value (a forward ends when its slowest rank ends)."""
    t = torch.tensor([seconds], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def sync(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def forward(layers, x):
    for layer in layers:
        x = x + layer(x)
    return x


def run_mode(ctx: ParallelContext, a, mode: str) -> dict:
    world = ctx.world_size
    phases = mode.startswith("phase")
    red = 0 if mode == "none-R=E" else a.redundant
    layers = build(ctx, a, red, phases)
    B = 2 if phases else 1
    stats = ExpertLoadStats(a.layers, a.experts, ctx.device, a.window, B, a.top_k)
    for layer in layers:
        layer.stats = stats
    reb = None
    if mode in ("online", "phase-static", "phase-model", "phase-forced"):
        cfg = EplbConfig(enabled=True, num_redundant_experts=red, window_size=a.window,
                         interval=a.window if mode == "online" else 10 ** 9, min_gain=0.05,
                         timestep_buckets=B, timestep_aware=mode in ("phase-model", "phase-forced"))
        reb = Rebalancer(layers, ctx, cfg, stats, force=mode == "phase-forced")
    steps = a.steps if phases else 1
    ts = [1.0 - (i + 0.5) / steps for i in range(steps)] if phases else [None]
    warm = a.window * (2 if phases else 1)
    if phases:  # warm-up covers whole sampling runs so every bucket has stats
        warm = max(warm, steps * 2)
        warm = (warm + steps - 1) // steps * steps
    total = warm + a.forwards
    if phases:
        total = warm + (a.forwards + steps - 1) // steps * steps
    times, rows0, load0 = [], None, None
    for f in range(total):
        t = ts[f % steps]
        if f == warm:
            if mode == "phase-static":
                reb.rebalance_now(f, trigger="static-all-timesteps",
                                  load=stats.total().sum(axis=(0, 1)).astype(np.float64))
            if mode in ("phase-model", "phase-forced"):
                reb.plan_phases(f)
                reb._maybe_switch_phase(f, stats.bucket_of(t))
            rows0 = [l._rows[0] for l in layers]
            load0 = stats.total().sum(axis=(0, 1)) + stats.counts.sum(dim=(0, 1)).cpu().numpy()
            n_events0 = len(reb.events) if reb else 0
        x = make_x(a, ctx, f, t)
        stats.begin_forward(0.5 if t is None else t)
        sync(ctx)
        dist.barrier()
        t0 = time.perf_counter()
        forward(layers, x)
        sync(ctx)
        dt = max_over_ranks(ctx, time.perf_counter() - t0)
        t_reb = time.perf_counter()
        if reb is not None:
            nxt = ts[(f + 1) % steps]
            reb.after_forward(f, 0.5 if t is None else t, next_timestep=None if nxt is None else nxt)
        else:
            stats.end_forward((ctx.ep_group, ctx.dp_group))
        sync(ctx)
        t_reb = max_over_ranks(ctx, time.perf_counter() - t_reb)
        if f >= warm:
            times.append((dt, t_reb))
    # measured load of the timed forwards
    rows = torch.tensor([l._rows[0] - r for l, r in zip(layers, rows0)], dtype=torch.float64,
                        device=ctx.device)                               # [L] this rank
    allrows = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(allrows, rows)
    per_rank = torch.stack(allrows, 1).cpu()                             # [L, ranks]
    bal = (per_rank.mean(1) / per_rank.max(1).values).numpy()
    load = (stats.total().sum(axis=(0, 1)) + stats.counts.sum(dim=(0, 1)).cpu().numpy()) - load0  # [L, E]
    fwd_t = [x for x, _ in times]
    med = statistics.median(fwd_t)
    events = reb.events[n_events0:] if reb else []
    res = {"mode": mode, "R": a.experts + red, "median_ms": med * 1e3,
           "tokens_per_s": world * a.tokens / med,
           "wall_tokens_per_s": world * a.tokens * len(times) / sum(x + y for x, y in times),
           "rebalance_ms_total": sum(y for _, y in times) * 1e3,
           "expert_max_over_mean": float((load.max(1) / load.mean(1)).mean()),
           "balancedness_mean": float(bal.mean()), "balancedness_min": float(bal.min()),
           "events_timed": [{k: e.get(k) for k in ("trigger", "status", "experts_moved", "bytes_moved", "time_ms",
                                                     "predicted_saving_ms", "predicted_cost_ms")} for e in events],
           "events_all": len(reb.events) if reb else 0,
           "first_event": ({k: reb.events[0].get(k) for k in ("status", "experts_moved", "bytes_moved", "time_ms",
                                                                "balancedness_before", "balancedness_after",
                                                                "measured_balancedness")} if reb and reb.events else None)}
    return res


def run_modes(ctx: ParallelContext, a) -> None:
    results = []
    for mode in a.modes:
        results.append(run_mode(ctx, a, mode))
        if ctx.rank == 0:
            print(json.dumps(results[-1]), flush=True)
    if ctx.rank == 0 and a.json:
        write_json_atomic(a.json, {"args": vars(a), "ranks": ctx.world_size, "device": str(ctx.device),
                                   "results": results})


def _entry(rank, world, port, a):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        run_modes(context_for_tests(rank, world, world), a)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank per forward")
    p.add_argument("--redundant", type=int, default=None, help="redundant slots (default 2 x ranks)")
    p.add_argument("--skew", type=float, default=1.2)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--forwards", type=int, default=16, help="timed forwards per mode")
    p.add_argument("--steps", type=int, default=8, help="forwards per sampling run (phase modes)")
    p.add_argument("--modes", default="none-R=E,none-R=E+r,online")
    p.add_argument("--json", default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="under a launcher: one rank per GPU with cuda (auto: a GPU when there is one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)   # passed by the deepspeed launcher
    a = p.parse_args(argv)
    a.modes = a.modes.split(",")
    if "RANK" in os.environ:        # under deepspeed / torchrun: the launcher's ranks, gloo or NCCL
        ctx = init_distributed(ParallelConfig(device=a.device, timeout_s=600))
        a.ranks = ctx.world_size
        a.redundant = 2 * a.ranks if a.redundant is None else a.redundant
        run_modes(ctx, a)
        return
    if a.device == "cuda":
        p.error("--device cuda needs one rank per GPU: start it with `deepspeed --num_gpus N benchmarks/bench_rebalance.py`")
    a.redundant = 2 * a.ranks if a.redundant is None else a.redundant
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(a.ranks, port, a), nprocs=a.ranks, join=True)


if __name__ == "__main__":
    main()
