"""Latency of one transformer forward of ONE prompt (guidance on: [cond; uncond]) of the built-in
MoE-DiT over cfg / sequence-parallel layouts, against the same forward on one rank.

    # CPU, 2 ranks, one thread each (docs/benchmarks.md): 1 rank vs Ulysses 2 vs ring 2 vs cfg 2
    deepspeed --num_gpus 2 benchmarks/bench_layout.py --device cpu --threads 1 --layouts ulysses2,ring2,cfg2
    # GPUs (benchmarks/gpu_runs.sh sp2 / cfg2 / usp4)
    deepspeed --num_gpus 4 benchmarks/bench_layout.py --device cuda --dtype bfloat16 --layouts ulysses2,cfg2,usp4

Every repetition runs the forwards interleaved -- the one-rank forward on rank 0 (the other ranks
wait at a barrier), then each layout on all ranks -- so a change in the machine's load touches
every row alike; the speed-up is the median over repetitions of (one-rank time / layout time)
of the same repetition ("paired"), beside the ratio of the medians. A layout smaller than the
world runs with dp = world / (cfg x sp) groups side by side (each its own copy of the prompt).
EP spans all ranks of a layout (`--ep world`, the default) or is 1 (`--ep 1`: every rank holds
every expert). Each layout's output is compared with the one-rank output (max relative error).
Weights are seeded (model.seed), the same for every layout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import ModelConfig, MoEConfig, ParallelConfig  # noqa: E402
from moe_ep.models.moedit.dit import MoEDiT  # noqa: E402
from moe_ep.parallel import ParallelContext, build_context, init_distributed  # noqa: E402

# layout name -> parallel config keys (dp fills the rest of the world)
LAYOUTS = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2), "cfg2": dict(cfg_parallel_size=2),
           "ulysses4": dict(ulysses_degree=4), "usp4": dict(ulysses_degree=2, ring_degree=2),
           "cfg2ulysses2": dict(cfg_parallel_size=2, ulysses_degree=2),
           "cfg2ulysses4": dict(cfg_parallel_size=2, ulysses_degree=4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default="ulysses2,ring2,cfg2", help=f"comma-separated: {', '.join(LAYOUTS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--latent", type=int, default=64, help="latent height = width (tokens = (latent / patch)^2)")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--ep", default="world", choices=["world", "1"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows here (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from deepspeed
    return p.parse_args(argv)


def model_config(a) -> ModelConfig:
    return ModelConfig(hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads, qk_norm=True, patch_size=a.patch,
                       text_dim=64, max_prompt_tokens=a.text_tokens, dtype=a.dtype, seed=0,
                       moe=MoEConfig(num_experts=a.experts, top_k=a.top_k, expert_hidden_size=a.expert_hidden,
                                     num_shared_experts=1))


def inputs(a, device):
    """One prompt with guidance: [cond; uncond] of the same latents, t = 0.5, random text."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, a.latent, a.latent, generator=g).repeat(2, 1, 1, 1)           # [2, C, h, w]
    text = torch.randn(2, a.text_tokens, 64, generator=g)                               # [2, T, 64]
    mask = torch.ones(2, a.text_tokens, dtype=torch.bool)
    return [v.to(device) for v in (x, torch.full((2,), 0.5), text, mask)]


def build(a, ctx: ParallelContext) -> MoEDiT:
    model = MoEDiT(model_config(a), ctx)
    # expert weights drawn by the device's generator on a GPU (fast; the same for every layout)
    model.init_from_seed(expert_device=ctx.device if ctx.device.type == "cuda" else None)
    return model


def timed(model, args, device) -> tuple[float, float, torch.Tensor, float]:
    """-> (wall ms, CPU ms of this process, output, GiB the forward allocated on top of what was
    resident; 0 on the CPU). On a shared CPU the CPU time is the work the rank did, whatever
    the other processes took from it; the wall time is the latency."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = model(*args)
    if cuda:
        torch.cuda.synchronize(device)
    ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    extra = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30 if cuda else 0.0
    return ms, cpu_ms, out, extra


def main(argv=None) -> int:
    a = parse_args(argv)
    base_ctx = init_distributed(ParallelConfig(device=a.device, timeout_s=600))
    torch.set_num_threads(a.threads)
    device, rank, world = base_ctx.device, base_ctx.rank, base_ctx.world_size
    names = [n for n in a.layouts.split(",") if n]
    for n in names:
        if n not in LAYOUTS:
            raise SystemExit(f"unknown layout {n!r}; layouts: {', '.join(LAYOUTS)}")
    one = build(a, ParallelContext(device=device)) if rank == 0 else None      # world of one, EP 1
    models = {}
    for n in names:   # collective: every rank builds every layout's groups
        par = ParallelConfig(device=a.device, timeout_s=600, ep_size=None if a.ep == "world" else 1, **LAYOUTS[n])
        models[n] = build(a, build_context(par, rank, world, device))
    args = inputs(a, device)
    times = {n: [] for n in ["1 rank"] + names}      # wall ms per forward (rank 0)
    cpu = {n: [] for n in times}                       # CPU ms per forward (rank 0's process)
    err, mem = {}, {}
    load = [os.getloadavg()[0]]
    for rep in range(a.warmup + a.reps):
        tdist.barrier()
        if rank == 0:
            ms, cpu_ms, ref, mem["1 rank"] = timed(one, args, device)
            if rep >= a.warmup:
                times["1 rank"].append(ms)
                cpu["1 rank"].append(cpu_ms)
        tdist.barrier()
        for n in names:
            tdist.barrier()
            ms, cpu_ms, out, mem[n] = timed(models[n], args, device)
            if rep >= a.warmup:
                times[n].append(ms)
                cpu[n].append(cpu_ms)
            if rank == 0:
                err[n] = max(err.get(n, 0.0), ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
    load.append(os.getloadavg()[0])
    if rank == 0:
        base = times["1 rank"]
        rows = []
        for n, ts in times.items():
            row = {"layout": n, "world": 1 if n == "1 rank" else world, "median_ms": statistics.median(ts),
                   "min_ms": min(ts), "cpu_ms": statistics.median(cpu[n]), "reps": len(ts)}
            if n != "1 rank":
                row.update(speedup_paired=statistics.median(b / t for b, t in zip(base, ts)),
                           cpu_ratio=statistics.median(cpu["1 rank"]) / statistics.median(cpu[n]),
                           speedup_of_medians=statistics.median(base) / statistics.median(ts), max_rel_err=err[n],
                           **{k: v for k, v in LAYOUTS[n].items()})
            if device.type == "cuda":   # rank 0's activations of one forward (weights come on top)
                row["forward_mem_gib"] = mem[n]
            rows.append(row)
            print(json.dumps(row), flush=True)
        meta = {"tokens": (a.latent // a.patch) ** 2, "hidden": a.hidden, "heads": a.heads, "layers": a.layers,
                "experts": a.experts, "top_k": a.top_k, "expert_hidden": a.expert_hidden, "dtype": a.dtype,
                "device": str(device), "threads": a.threads, "ep": a.ep, "load_before_after": load}
        print(json.dumps(meta), flush=True)
        if a.json:
            write_json_atomic(a.json, {"meta": meta, "rows": rows})
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
