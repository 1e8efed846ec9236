"""Synchronous vs asynchronous (layer-by-layer) migration: the stall a rebalance adds to the
sampling loop, and the staging memory, on CPU gloo ranks (or one rank per GPU under a launcher).

    deepspeed --num_gpus 2 launch/bench_migration.py --layers 8 --experts 16 --hidden 512 --expert-hidden 1024

Every rank builds the same stack of MoE layers; a random placement (every expert's slot moves with
high probability) is installed every `--interval` forwards, once with eplb.migration = "sync" and
once "async". Reported per mode (rank 0, medians over the migrations): the time after_forward held
the loop at the forward that started a migration and at every forward while it ran, bytes moved,
and the largest staging of one step (async) against the whole move (sync).
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
    layers = []
    for l in range(a.layers):
        torch.manual_seed(l)
        layer = MoELayer(a.hidden, cfg, ctx, num_redundant=red, layer_idx=l)
        layer.load_expert_weights(lambda e, l=l: init_expert_weights(0, l, e, a.hidden, a.expert_hidden))
        layers.append(layer)
    eplb = EplbConfig(enabled=True, num_redundant_experts=red, window_size=1, interval=a.interval, min_gain=-1.0,
                      migration=mode)
    stats = ExpertLoadStats(a.layers, a.experts, ctx.device, 1, top_k=2)
    reb = Rebalancer(layers, ctx, eplb, stats, planner=random_planner(1), force=True,
                     transfer_timeout_s=ctx.timeout_s)
    x = torch.randn(a.tokens, a.hidden, device=ctx.device)
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
    per_expert = (layers[0].experts.w13[0].numel() + layers[0].experts.w2[0].numel()) * 4
    return {"mode": mode, "forward_ms": statistics.median(fwd) * 1e3,
            "stall_ms_median": statistics.median(stall) * 1e3, "stall_ms_max": max(stall) * 1e3,
            "stall_ms_total": sum(stall) * 1e3, "migrations": len(events),
            "bytes_moved_per_migration": statistics.median(e["bytes_moved"] for e in events) if events else 0,
            "async_peak_staging_bytes": max((e.get("peak_staging_bytes", 0) for e in events), default=0),
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
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    ctx = init_distributed(ParallelConfig(device=a.device))
    rows = [run_mode(ctx, a, mode) for mode in ("sync", "async")]
    if ctx.rank == 0:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
