"""diffusers' own MoE blocks vs the same blocks served by moe-ep, same weights, one run.

    # one H200, bf16, the real sizes (docs/benchmarks.md, "diffusers MoE layers")
    python benchmarks/bench_diffusers.py --device cuda --dtype bfloat16
    # CPU: EP = 2 ranks against diffusers' own module in one process (tokens/s)
    deepspeed --num_gpus 2 benchmarks/bench_diffusers.py --device cpu --small
    # the whole transformer (every block, diffusers vs moe-ep with each speed option, one GPU):
    # the rest of the arguments go to benchmarks/bench_transformer.py (its --help lists them)
    python benchmarks/bench_diffusers.py --whole --model nucleus --accuracy-layers 8 --out nucleus.json

HiDream-I1: `MOEFeedForwardSwiGLU` (hidden 2560, expert hidden 6912, 4 experts, top-2, shared
expert) at 4096 / 8192 / 16384 tokens. NucleusMoE-Image: `NucleusMoELayer` (hidden 2048, expert
hidden 1344, 128 experts, expert choice with capacity factor 8, shared expert, diffusers'
`use_grouped_mm=True`) at 2 x 4096 and 8 x 4096 rows. moe-ep is timed with the model's own
score numerics (`score_dtype="input"`) and with float32 scores; for each, the tokens whose
expert set differs from diffusers' choice, and the output's relative error against diffusers.
Floor: the routed and shared expert FLOPs at 781 TFLOP/s (docs/anchors.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import ParallelConfig  # noqa: E402
from moe_ep.models.diffusers import HIDREAM, NUCLEUS, wrap_transformer  # noqa: E402
from moe_ep.models.diffusers.tiny import init_random  # noqa: E402
from moe_ep.parallel import ParallelContext, init_distributed  # noqa: E402

PEAK_FLOPS = 781e12


def timed(fn, device, iters=20, warmup=5) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            import time
            t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def hidream_block(hidden, experts, top_k):
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
    return MOEFeedForwardSwiGLU(hidden, 4 * hidden, experts, top_k)


def nucleus_block(hidden, inner, experts, cf):
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoELayer
    return NucleusMoELayer(hidden, inner, experts, cf, use_sigmoid=False, route_scale=2.5, use_grouped_mm=True)


class Holder(nn.Module):
    """One block under a parent module, so wrap_transformer can replace it in place."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


def expert_sets_differ(ref_ids: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of tokens whose chosen expert set differs: ids [T, k] each."""
    return float((ref_ids.sort(-1).values != ids.sort(-1).values).any(-1).float().mean())


def one_case(name, make_block, spec, call_args, flops, ctx, dtype, reps):
    """-> dict row. call_args(dtype, device) -> (args, kwargs) of the block's forward."""
    dev = ctx.device
    torch.manual_seed(0)
    own = init_random(make_block(), 0).to(dev, dtype).eval()
    args, kwargs = call_args(dtype, dev)
    row = {"case": name, "floor_ms": flops / PEAK_FLOPS * 1e3}
    with torch.no_grad():
        ref = own(*args, **kwargs).float() if ctx.rank == 0 else None
        if ctx.rank == 0:   # diffusers' own module in one process, with every core the EP ranks use
            threads = torch.get_num_threads()
            if dev.type == "cpu":
                torch.set_num_threads(threads * ctx.world_size)
            row["diffusers_ms"] = timed(lambda: own(*args, **kwargs), dev, iters=reps)
            torch.set_num_threads(threads)
        if ctx.world_size > 1:
            dist.barrier()
        for score_dtype in ("input", "float32"):
            holder = Holder(init_random(make_block(), 0).to(dev, dtype).eval())
            wrappers, _ = wrap_transformer(holder, ctx, spec=spec, score_dtype=score_dtype, dtype=dtype)
            out = holder(*args, **kwargs).float()
            row[f"moe_ep_{score_dtype}_ms"] = timed(lambda: holder(*args, **kwargs), dev, iters=reps)
            if ref is not None:
                row[f"rel_err_{score_dtype}"] = float((out - ref).norm() / ref.norm())
            if spec is HIDREAM and ref is not None:
                x = args[0].reshape(-1, args[0].shape[-1])
                ref_ids = own.gate(args[0])[0].reshape(x.shape[0], -1)
                _, ids = wrappers[0].moe.router(x)
                row[f"tokens_changing_experts_{score_dtype}"] = expert_sets_differ(ref_ids, ids)
            del holder, wrappers
    return row


def whole_transformer(argv: list[str]) -> int:
    """`--whole`: benchmarks/bench_transformer.py's main with the other arguments."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_transformer.py")
    spec = importlib.util.spec_from_file_location("bench_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--whole" in argv:
        return whole_transformer([a for a in argv if a != "--whole"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--whole", action="store_true",
                   help="the whole transformer instead: the other arguments go to benchmarks/bench_transformer.py")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--small", action="store_true", help="tiny-but-not-trivial sizes (CPU)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    ctx: ParallelContext = init_distributed(ParallelConfig(device=a.device))
    if a.small:
        H, HT = 256, [512, 2048]
        NH, NF, NE, NT = 128, 96, 16, [(2, 256)]
    else:
        H, HT = 2560, [4096, 8192, 16384]
        NH, NF, NE, NT = 2048, 1344, 128, [(2, 4096), (8, 4096)]
    probe = hidream_block(H, 1, 1) if a.small else None   # F = 6912, shared 3584 at hidden 2560
    inner = probe.experts[0].w1.out_features if probe else 6912
    shared = probe.shared_experts.w1.out_features if probe else 3584
    rows = []
    for T in HT:
        flops = 2 * 3 * H * (2 * T * inner + T * shared)           # per rank

        def hd_args(dt, dev, T=T):
            g = torch.Generator(device="cpu").manual_seed(ctx.rank)
            return (torch.randn(1, T, H, generator=g).to(dev, dt),), {}
        rows.append(one_case(f"HiDream {T} tokens", lambda: hidream_block(H, 4, 2), HIDREAM, hd_args, flops, ctx,
                             dtype, a.reps))
    for B, S in NT:
        C = -(-8 * S // NE)
        flops = 2 * 3 * NH * NF * (B * NE * C + B * S)

        def nc_args(dt, dev, B=B, S=S):
            g = torch.Generator(device="cpu").manual_seed(100 + ctx.rank)
            x = torch.randn(B, S, NH, generator=g).to(dev, dt)
            return (x, torch.randn(B, S, NH, generator=g).to(dev, dt), torch.randn(B, NH, generator=g).to(dev, dt)), {}
        rows.append(one_case(f"NucleusMoE {B} x {S} rows", lambda: nucleus_block(NH, NF, NE, 8.0), NUCLEUS, nc_args,
                             flops, ctx, dtype, a.reps))
    if ctx.world_size > 1:
        dist.barrier()
    if ctx.rank == 0:
        for r in rows:
            print(json.dumps(r))
        if a.out:
            write_json_atomic(a.out, {"device": str(ctx.device), "dtype": a.dtype, "ep": ctx.ep_size, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
