"""Synchronous vs asynchronous (layer-by-layer) migration: the stall a rebalance adds to the
sampling loop, and the staging memory, on CPU gloo ranks (or one rank per GPU under a launcher).

    deepspeed --num_gpus 2 benchmarks/bench_migration.py --layers 8 --experts 16 --hidden 512 --expert-hidden 1024
    # 2 GPUs, experts of the anchor size (75 MB in bf16): the point-to-point rate of the moves
    deepspeed --num_gpus 2 benchmarks/bench_migration.py --device cuda --dtype bfloat16 --layers 4 --experts 32 \
        --hidden 4096 --expert-hidden 3072 --tokens 8192 --forwards 20 --interval 5

Every rank builds the same stack of MoE layers; a random placement (every expert's slot moves with
high probability) is installed every `--interval` forwards, once with eplb.migration = "sync" and
once "async". Reported per mode (rank 0, medians over the migrations): the time after_forward held
the loop at the forward that started a migration and at every forward while it ran, bytes moved,
and the largest staging of one step (async) against the whole move (sync); for the synchronous
moves also the exchange's own time and its rate, bytes sent per rank per second (docs/anchors.md:
one 75 MB expert goes at about 225 GB/s between two H200s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import DTYPES  # noqa: E402  (benchmarks/bench.py, beside this script)
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import EplbConfig, MoEConfig, ParallelConfig  # noqa: E402
from moe_ep.experts import init_expert_weights  # noqa: E402
from moe_ep.layer import MoELayer  # noqa: E402
from moe_ep.parallel import init_distributed  # noqa: E402
from moe_ep.rebalance import Rebalancer  # noqa: E402
from moe_ep.stats import ExpertLoadStats  # noqa: E402


def random_planner(seed):
    gen = torch.Generator().manual_seed(seed)

    def plan(weight, num_replicas, *args, **kw):
        L, E = torch.as_tensor(weight).shape
        rows = []
        for _ in range(L):
            ids = torch.cat([torch.arange(E), torch.randint(0, E, (num_replicas - E,), generator=gen)])
            rows.append(ids[torch.randperm(num_replicas, generator=gen)])
        return torch.stack(rows), None, None
    return plan


def run_mode(ctx, a, mode):
    cfg = MoEConfig(num_experts=a.experts, top_k=2, expert_hidden_size=a.expert_hidden)
    red = ctx.ep_size * 2
    dtype = DTYPES[a.dtype]
    on_gpu = ctx.device if ctx.device.type == "cuda" else None
    layers = []
    for l in range(a.layers):
        torch.manual_seed(l)
        layer = MoELayer(a.hidden, cfg, ctx, num_redundant=red, layer_idx=l, dtype=dtype)
        layer.load_expert_weights(lambda e, l=l: init_expert_weights(0, l, e, a.hidden, a.expert_hidden, dtype, on_gpu))
        layers.append(layer)
    eplb = EplbConfig(enabled=True, num_redundant_experts=red, window_size=1, interval=a.interval, min_gain=-1.0,
                      migration=mode)
    stats = ExpertLoadStats(a.layers, a.experts, ctx.device, 1, top_k=2)
    reb = Rebalancer(layers, ctx, eplb, stats, planner=random_planner(1), force=True,
                     transfer_timeout_s=ctx.timeout_s)
    x = torch.randn(a.tokens, a.hidden, device=ctx.device, dtype=dtype)
    stall, fwd = [], []
    for f in range(a.forwards):
        t0 = time.perf_counter()
        h = x
        for layer in layers:
            h = h + layer(h)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)   # the stall below is the rebalancer's, not the forward's tail
        t1 = time.perf_counter()
        reb.after_forward(f, 0.5)
        stall.append(time.perf_counter() - t1)
        fwd.append(t1 - t0)
    reb.finish_migration()
    events = [e for e in reb.events if e.get("status") == "ok"]
    per_expert = (layers[0].experts.w13[0].numel() + layers[0].experts.w2[0].numel()) * layers[0].experts.w13.element_size()
    # synchronous moves: bytes each rank sent (all ranks' bytes / EP size) over the exchange's time
    rates = [e["bytes_moved"] / ctx.ep_size / (e["transfer_ms"] / 1e3) for e in events if e.get("transfer_ms")]
    return {"mode": mode, "forward_ms": statistics.median(fwd) * 1e3,
            "stall_ms_median": statistics.median(stall) * 1e3, "stall_ms_max": max(stall) * 1e3,
            "stall_ms_total": sum(stall) * 1e3, "migrations": len(events),
            "bytes_moved_per_migration": statistics.median(e["bytes_moved"] for e in events) if events else 0,
            "async_peak_staging_bytes": max((e.get("peak_staging_bytes", 0) for e in events), default=0),
            "transfer_ms_median": statistics.median(e["transfer_ms"] for e in events if e.get("transfer_ms"))
            if rates else None,
            "p2p_send_gb_s_median": statistics.median(rates) / 1e9 if rates else None,
            "expert_bytes": per_expert,
            "one_layer_slots_bytes": layers[0].slots_per_rank * per_expert,
            "all_layers_slots_bytes": a.layers * layers[0].slots_per_rank * per_expert}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--forwards", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", help="also write the rows to this file (rank 0)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    ctx = init_distributed(ParallelConfig(device=a.device))
    rows = [run_mode(ctx, a, mode) for mode in ("sync", "async")]
    if ctx.rank == 0:
        for r in rows:
            print(json.dumps(r))
        if a.json:
            write_json_atomic(a.json, {"args": vars(a), "ranks": ctx.world_size, "device": str(ctx.device),
                                       "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
